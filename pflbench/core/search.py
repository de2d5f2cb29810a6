"""Search spaces, declared by each algorithm next to its hyperparameters' defaults.

    @dataclass
    class Hyperparams:
        mu: float = tunable(0.01, Real(1e-3, 1.0, log=True))

`search_space(cls)` reads them back; the tuner (:mod:`pflbench.experiments.tuning`) turns each into
Optuna suggestions. Nothing here imports Optuna: a space only calls the `suggest_*` method of the
trial it is handed, so an algorithm file stays free of the tuner.

A user narrows or fixes a space from a sweep's TOML (`[search.fedobp] q = [0.999, 0.99999]`):
:func:`override` turns two numbers into new bounds of the same kind, a list into new choices, and a
single value into a fixed one that is not searched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

from pflbench.errors import UserError

SEARCH = "search"


class Space(Protocol):
    def suggest(self, trial: Any, name: str) -> Any:
        """Draw the hyperparameter `name` from `trial` (an Optuna trial)."""

    def params(self, name: str, value: Any) -> dict[str, Any]:
        """The trial parameters that stand for `value` (to enqueue a known point, e.g. the default)."""

    def describe(self) -> str:
        """One line for `pflbench list` and the report."""


@dataclass(frozen=True)
class Real:
    """A float in [low, high], uniform or (log=True) log-uniform."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            scale = " or not positive (log scale)" if self.log else ""
            raise UserError(f"search range [{self.low}, {self.high}] is empty{scale}; give [low, high] with low < high")

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def params(self, name: str, value: Any) -> dict[str, Any]:
        return {name: float(value)}

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")

    def narrowed(self, low: float, high: float) -> "Real":
        return Real(float(low), float(high), self.log)


@dataclass(frozen=True)
class Integer:
    """An integer in [low, high]."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise UserError(f"search range [{self.low}, {self.high}] is empty; give [low, high] with low < high")

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def params(self, name: str, value: Any) -> dict[str, Any]:
        return {name: int(value)}

    def describe(self) -> str:
        return f"{{{self.low}..{self.high}}}" + (" log" if self.log else "")

    def narrowed(self, low: float, high: float) -> "Integer":
        if low != int(low) or high != int(high):
            raise UserError(f"search range [{low}, {high}] must be integers for an integer hyperparameter")
        return Integer(int(low), int(high), self.log)


@dataclass(frozen=True)
class NearOne:
    """A float in [low, high] just below 1 whose gap to 1 is log-uniform: FedOBP's quantile q
    (0.999 to 0.99998 in its paper) needs as many draws near 0.99999 as near 0.999, which a log
    scale on q itself (nearly flat there) does not give. The trial parameter is `1-<name>`."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high < 1:
            raise UserError(f"search range [{self.low}, {self.high}] must satisfy 0 < low < high < 1")

    def suggest(self, trial: Any, name: str) -> float:
        return 1.0 - trial.suggest_float(f"1-{name}", 1.0 - self.high, 1.0 - self.low, log=True)

    def params(self, name: str, value: Any) -> dict[str, Any]:
        return {f"1-{name}": 1.0 - float(value)}

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}], 1-x log"

    def narrowed(self, low: float, high: float) -> "NearOne":
        return NearOne(float(low), float(high))


@dataclass(frozen=True)
class Choice:
    """One of a few values (a variant, a scoring rule)."""

    options: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.options) < 2 or len(set(self.options)) != len(self.options):
            raise UserError(f"search choices {list(self.options)} need at least two distinct values")

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.options))

    def params(self, name: str, value: Any) -> dict[str, Any]:
        return {name: value}

    def describe(self) -> str:
        return "{" + ", ".join(map(str, self.options)) + "}"


@dataclass(frozen=True)
class Fixed:
    """A value the user pinned: part of every trial, never searched."""

    value: Any

    def suggest(self, trial: Any, name: str) -> Any:
        return self.value

    def params(self, name: str, value: Any) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return f"= {self.value}"


def show_value(value: Any) -> str:
    """A drawn value for people: 6 significant digits, so a q of 0.999985 is not shown as 1."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def tunable(default: Any, space: Space) -> Any:
    """A dataclass field with `default` whose search space is `space`."""
    return dataclasses.field(default=default, metadata={SEARCH: space})


def search_space(hyperparams_cls: type) -> dict[str, Space]:
    """The declared spaces of a Hyperparams dataclass, in field order."""
    return {f.name: f.metadata[SEARCH] for f in dataclasses.fields(hyperparams_cls) if SEARCH in f.metadata}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def override(space: Space | None, value: Any, where: str) -> Space:
    """The space a user's TOML value makes of `space` (None: the key is not searched by default):
    `[low, high]` narrows a range, a list of values is a choice, a single value is fixed."""
    if not isinstance(value, list):
        return Fixed(value)
    ranged = isinstance(space, (Real, Integer, NearOne))
    if ranged and len(value) == 2 and all(map(_is_number, value)):
        try:
            return space.narrowed(*value)  # type: ignore[union-attr]
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if ranged:
        raise UserError(f"{where}: give [low, high] (two numbers) to narrow this range, or one value to fix it")
    try:
        return Choice(tuple(value))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None

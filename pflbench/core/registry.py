"""Algorithms registered by name, found as plugins, with typed hyperparameters.

Built-in algorithms (the `algorithms` package) are declared in the entry-point group
``pflbench.algorithms`` exactly as a third-party package declares its own; a single file or
folder is loaded with ``--plugin PATH``. Importing a plugin module runs its
``@register_algorithm`` decorators.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

from pflbench.errors import UserError

ENTRY_POINT_GROUP = "pflbench.algorithms"
ALGORITHMS: dict[str, type] = {}
_loaded_entry_points = False


def register_algorithm(name: str) -> Callable[[type], type]:
    """Class decorator: make the algorithm available as `--algo name`."""

    def decorate(cls: type) -> type:
        if not dataclasses.is_dataclass(cls.Hyperparams):
            raise TypeError(f"{cls.__name__}.Hyperparams must be a dataclass")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


def _import_entry_points() -> list[str]:
    """Import every module of the entry-point group; return one warning per broken one."""
    warnings = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the built-ins down
            warnings.append(f"plugin '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}")
    return warnings


def _import_builtins_from_source() -> None:
    """Fallback when the package metadata is absent (running from a bare checkout)."""
    import algorithms  # noqa: F401  (the package imports nothing by itself)

    for path in sorted(Path(algorithms.__file__).parent.glob("[!_]*.py")):
        importlib.import_module(f"algorithms.{path.stem}")


def load_plugin(path: str | Path) -> None:
    """Import a plugin file, or every `.py` file of a folder; a failure is one UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"plugin {path} does not exist; pass a .py file or a folder of them")
    files = sorted(p for p in path.glob("*.py") if not p.name.startswith("_")) if path.is_dir() else [path]
    for file in files:
        module_name = "pflbench_plugin_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise UserError(f"plugin {file} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise UserError(f"plugin {file} failed to load: {type(exc).__name__}: {exc}") from None


def load_algorithms(plugins: Iterable[str | Path] = ()) -> list[str]:
    """Register built-ins and installed plugins (once), then `plugins`; return warnings."""
    global _loaded_entry_points
    warnings: list[str] = []
    if not _loaded_entry_points:
        warnings = _import_entry_points()
        _import_builtins_from_source()
        _loaded_entry_points = True
    for plugin in plugins:
        load_plugin(plugin)
    return warnings


def get_algorithm(name: str) -> type:
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; choose one of {', '.join(sorted(ALGORITHMS))} "
                        "(or load yours with --plugin PATH)")
    return ALGORITHMS[name]


def _convert(raw: str, kind: Any, key: str, algo: str) -> Any:
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--hp {key}={raw}: {algo}'s {key} takes true or false")
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
    if choices:
        if raw not in choices:
            raise UserError(f"--hp {key}={raw}: {algo}'s {key} takes one of {', '.join(map(str, choices))}")
        return raw
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise UserError(f"--hp {key}={raw}: {algo}'s {key} takes a {kind.__name__}") from None


def resolve_hyperparams(cls: type, overrides: dict[str, Any]) -> Any:
    """The algorithm's Hyperparams dataclass with `overrides` (strings from --hp, or typed values)."""
    fields = {f.name: f for f in dataclasses.fields(cls.Hyperparams)}
    types = typing.get_type_hints(cls.Hyperparams)
    values = {}
    for key, raw in overrides.items():
        scope, _, name = key.rpartition(".")
        if scope:  # `ALGO.KEY`, as a sweep takes it, is accepted for the one algorithm it names
            if scope != cls.name:
                raise UserError(f"--hp {key}: this run trains {cls.name}, not {scope}; "
                                f"pass {name}=VALUE or {cls.name}.{name}=VALUE")
            key = name
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(f"--hp {key}: {cls.name} has no hyperparameter '{key}' (it has: {known})")
        values[key] = _convert(raw, types[key], key, cls.name) if isinstance(raw, str) else raw
    try:
        return cls.Hyperparams(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{cls.name} hyperparameters rejected: {exc}") from None


ADDED_LATER = "pflbench.added_later"


def added_later(default: Any) -> Any:
    """A hyperparameter field added after runs of its algorithm were recorded: while it holds
    `default` it is left out of a run's recorded hyperparameters (`recorded_hyperparams`), and so
    out of its id, as `LATER_SETTINGS` does for run settings; the older records keep matching."""
    return dataclasses.field(default=default, metadata={ADDED_LATER: True})


def recorded_hyperparams(hyperparams: Any) -> dict[str, Any]:
    """Resolved hyperparameters as a run's config records them: every field, except one added later
    (`added_later`) that holds its default."""
    return {f.name: getattr(hyperparams, f.name) for f in dataclasses.fields(hyperparams)
            if not (f.metadata.get(ADDED_LATER) and getattr(hyperparams, f.name) == f.default)}


def hyperparam_defaults(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls.Hyperparams())


def parse_hp_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings into a dict; a malformed pair is a UserError."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--hp expects KEY=VALUE (got '{pair}')")
        out[key.strip()] = value.strip()
    return out

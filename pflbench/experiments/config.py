"""One frozen dataclass holds every setting of a run.

The CLI, presets and config files all produce a :class:`RunConfig`; its canonical JSON is what
a run's identity hashes, so two runs with the same resolved settings share one id. A setting added
after records were committed is left out of that JSON while it holds its default
(`LATER_SETTINGS`), so adding a setting never orphans the records that predate it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from pflbench.core.partition import holdout_count
from pflbench.errors import UserError

PARTITION_SCHEMES = ("dirichlet", "exdir", "shards", "iid", "quantity", "natural")
SIZE_DISTRIBUTIONS = ("lognormal", "powerlaw")
NATURAL_PICKS = ("largest", "sample")
FEATURE_SKEWS = ("none", "rotate", "noise")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LATER_SETTINGS = {"val_ratio": 0.0, "precision": "fp32", "tuned_budget": 0, "tuned_study": "",
                  "sigma": 1.0, "size_dist": "lognormal", "natural_pick": "largest",
                  "feature_skew": "none", "skew_strength": 0.0, "holdout_clients": 0.0}


def without_later_defaults(values: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` less the later settings that hold their defaults (those in `keep` stay): what run
    ids, protocol keys and study names hash, so adding a setting renames none of them."""
    return {k: v for k, v in values.items() if k in keep or LATER_SETTINGS.get(k, object()) != v}


def check_seed(seed: int) -> None:
    """A seed is what numpy's and torch's generators all take: an integer in [0, 2**32)."""
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be an integer in [0, 2**32) (got {seed}), e.g. 0, 1, 2")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result (the device and paths excepted)."""

    algo: str = "fedavg"
    dataset: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.1
    classes_per_client: int = 2
    clients: int = 20
    join_ratio: float = 1.0
    rounds: int = 20
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    model: str = "auto"
    seed: int = 0
    eval_every: int = 5
    finetune_epochs: int = 0
    test_ratio: float = 0.25
    min_samples: int = 10
    val_ratio: float = 0.0
    precision: str = "fp32"
    sigma: float = 1.0  # quantity skew: the spread of client sizes (see pflbench.core.schemes)
    size_dist: str = "lognormal"  # quantity skew: lognormal or powerlaw
    natural_pick: str = "largest"  # natural partition: the N largest clients, or a seeded sample
    feature_skew: str = "none"  # none, rotate or noise: a per-client input transform
    skew_strength: float = 0.0  # rotate: the largest angle in degrees; noise: the largest noise std
    holdout_clients: float = 0.0  # a seeded share of clients that never trains, scored as newcomers
    tuned_budget: int = 0  # > 0: the hyperparameters (and lr) were chosen by a study of this budget
    tuned_study: str = ""  # the name of that study (`pflbench tune`)
    hp: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_setting_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        checks = [
            (self.alpha > 0, f"--alpha must be > 0 (got {self.alpha}); use e.g. 0.1 for strong skew"),
            (self.clients >= 1, f"--clients must be >= 1 (got {self.clients})"),
            (0 < self.join_ratio <= 1, f"--join-ratio must be in (0, 1] (got {self.join_ratio})"),
            (self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})"),
            (self.local_epochs >= 0, f"--local-epochs must be >= 0 (got {self.local_epochs})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1) (got {self.momentum})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.eval_every >= 1, f"--eval-every must be >= 1 (got {self.eval_every})"),
            (self.finetune_epochs >= 0, f"--finetune-epochs must be >= 0 (got {self.finetune_epochs})"),
            (0 < self.test_ratio < 1, f"--test-ratio must be in (0, 1) (got {self.test_ratio})"),
            (0 <= self.val_ratio < 1,
             f"--val-ratio must be in [0, 1) (got {self.val_ratio}); e.g. 0.1 holds out a tenth of each "
             "client's training share"),
            (self.tuned_budget >= 0, f"tuned_budget must be >= 0 (got {self.tuned_budget})"),
            (self.min_samples >= 2, f"--min-samples must be >= 2 (got {self.min_samples})"),
            (self.classes_per_client >= 1,
             f"--classes-per-client must be >= 1 (got {self.classes_per_client})"),
            (self.precision in PRECISIONS,
             f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}"),
            (self.sigma > 0, f"--sigma must be > 0 (got {self.sigma}); 1.0 is a moderate quantity skew"),
            (self.size_dist in SIZE_DISTRIBUTIONS,
             f"unknown --size-dist '{self.size_dist}'; choose one of {', '.join(SIZE_DISTRIBUTIONS)}"),
            (self.natural_pick in NATURAL_PICKS,
             f"unknown --natural-pick '{self.natural_pick}'; choose one of {', '.join(NATURAL_PICKS)}"),
            (self.feature_skew in FEATURE_SKEWS,
             f"unknown --feature-skew '{self.feature_skew}'; choose one of {', '.join(FEATURE_SKEWS)}"),
            (self.skew_strength >= 0, f"--skew-strength must be >= 0 (got {self.skew_strength})"),
            (self.feature_skew != "rotate" or self.skew_strength <= 180,
             f"--skew-strength is the largest rotation in degrees, at most 180 (got {self.skew_strength})"),
            (0 <= self.holdout_clients < 1,
             f"--holdout-clients must be in [0, 1) (got {self.holdout_clients}); 0.2 holds out a fifth of the clients"),
            (self.holdout_clients == 0 or self.clients >= 2,
             "--holdout-clients needs at least 2 clients (one to train, one held out)"),
            (self.partition in PARTITION_SCHEMES,
             f"unknown partition '{self.partition}'; choose one of {', '.join(PARTITION_SCHEMES)}"),
        ]
        check_seed(self.seed)
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round: a share of those that train (holdout clients never do)."""
        return max(1, round(self.join_ratio * self.training_clients))

    @property
    def training_clients(self) -> int:
        """How many clients train: all but the holdout share (`partition.holdout_clients`)."""
        return self.clients - holdout_count(self.holdout_clients, self.clients)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        values = without_later_defaults(self.to_dict())
        return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)

    def run_id(self) -> str:
        """A readable prefix plus a hash of the canonical JSON: equal configs, equal ids."""
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]
        alpha = {"dirichlet": f"a{self.alpha:g}", "exdir": f"exdir-a{self.alpha:g}",
                 "quantity": f"quantity{self.sigma:g}"}.get(self.partition, self.partition)
        return f"{self.algo}-{self.dataset}-{alpha}-s{self.seed}-{digest}"

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def is_integer(value: Any) -> bool:
    """An int (numpy's too), but not a bool: `rounds = true` is a mistake, not 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float (numpy's too), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# What a field's annotation accepts, and how a message names it.
TYPE_CHECKS: dict[type, tuple[Callable[[Any], bool], str]] = {
    int: (is_integer, "an integer"),
    float: (is_number, "a number"),
    str: (lambda value: isinstance(value, str), "a string"),
    dict: (lambda value: isinstance(value, dict), "a table of hyperparameters"),
}


@functools.cache
def setting_types() -> dict[str, type]:
    """Each RunConfig field's annotation as a plain type (int, float, str or dict); the annotations
    are strings here (`from __future__ import annotations`), hence get_type_hints."""
    hints = typing.get_type_hints(RunConfig)
    return {name: typing.get_origin(hint) or hint for name, hint in hints.items()}


def check_setting_types(values: dict[str, Any]) -> None:
    """Each known setting's value has its field's type, so a config file's `rounds = "ten"` is a
    one-line UserError rather than a TypeError in the range checks. Unknown names are skipped."""
    kinds = setting_types()
    for name, value in values.items():
        if name not in kinds:
            continue
        accepts, noun = TYPE_CHECKS[kinds[name]]
        if not accepts(value):
            raise UserError(f"{name} must be {noun} (got {value!r})")


# The settings a sweep shares across its cells: everything but the grid's axes and what tuning fills in.
SETTING_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig)
                     if f.name not in ("algo", "dataset", "alpha", "seed", "hp", "tuned_budget", "tuned_study"))
# Settings that do not define the protocol a tuning study serves: the validation share only serves
# the tuning, so a study tuned with 10% held out serves final cells that hold out nothing.
NOT_PROTOCOL = ("val_ratio",)


def resolved_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Every shared setting, defaults filled in, from a partial dict (a plan's) or a run's config."""
    config = RunConfig(**{k: v for k, v in settings.items() if k in SETTING_KEYS})
    return {k: getattr(config, k) for k in SETTING_KEYS}


def protocol_key(settings: dict[str, Any]) -> str:
    """What a tuned cell and its tuning study must share: every setting but the tuning-only ones."""
    # as in run ids, a later setting at its default is left out, so adding a setting keeps studies
    full = {k: v for k, v in sorted(without_later_defaults(resolved_settings(settings)).items())
            if k not in NOT_PROTOCOL}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]

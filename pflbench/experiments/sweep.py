"""A sweep: the grid of run configs (algorithms x datasets x alphas x seeds), run through an
executor into one results folder, skipping every run that already has a record.

A run's identity is the hash of its resolved config, and a record appears only when complete
(see :mod:`pflbench.experiments.records`), so a sweep killed at any moment and started again redoes nothing
that finished and loses nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pflbench.experiments.config import SETTING_KEYS, RunConfig, check_setting_types, is_integer, is_number, \
    resolved_settings
from pflbench.core.data import BUILTIN_DATASETS
from pflbench.core.models import batchnorm_variant
from pflbench.errors import UserError
from pflbench.experiments.executors import Cell, make_executor
from pflbench.experiments.presets import preset
from pflbench.experiments.records import RunRecord, remove_stale_staging, run_status, write_run
from pflbench.core.registry import ALGORITHMS, get_algorithm, parse_hp_pairs, recorded_hyperparams, resolve_hyperparams

GRID_KEYS = ("algos", "datasets", "alphas", "seeds")


@dataclass
class SweepPlan:
    algos: list[str]
    datasets: list[str]
    alphas: list[float]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    hp: dict[str, str] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)  # the config's [search] table, for `tune`

    def configs(self) -> list[RunConfig]:
        """Every cell of the grid as a RunConfig, hyperparameters resolved per algorithm."""
        per_algo = {a: hp_for(a, self.hp) for a in self.algos}
        return [RunConfig(algo=a, dataset=d, alpha=alpha, seed=s, hp=per_algo[a], **self.settings_for(a))
                for d in self.datasets for alpha in self.alphas for a in self.algos for s in self.seeds]

    def settings_for(self, algo: str) -> dict[str, Any]:
        """The grid's settings for one algorithm: an algorithm that needs BatchNorm layers (FedBN)
        gets the BatchNorm version of the grid's model (mlp -> smallcnn_bn, fedavgcnn ->
        fedavgcnn_bn), recorded in its config, so `--algos all` runs it rather than failing; its
        rows then form their own protocol, beside FedAvg run on that model if the grid asks."""
        model = self.settings.get("model")
        if model is None or get_algorithm(algo).model_needs != "batchnorm":
            return self.settings
        return {**self.settings, "model": batchnorm_variant(model)}


def hp_for(algo: str, overrides: dict[str, str]) -> dict[str, Any]:
    """The algorithm's resolved hyperparameters: `ALGO.KEY` entries for it, plain `KEY` entries
    where it declares that key."""
    cls = get_algorithm(algo)
    names = {f.name for f in dataclasses.fields(cls.Hyperparams)}
    mine = {}
    for key, value in overrides.items():
        scope, _, name = key.rpartition(".")
        if (scope == algo) or (not scope and name in names):
            mine[name] = value
    return recorded_hyperparams(resolve_hyperparams(cls, mine))


def hp_owners(key: str, algos: list[str]) -> list[str]:
    """The algorithms of `algos` that an `--hp` key (`name` or `algo.name`) sets."""
    scope, _, name = key.rpartition(".")
    return [a for a in algos if scope in ("", a)
            and name in {f.name for f in dataclasses.fields(get_algorithm(a).Hyperparams)}]


def check_hp_keys(algos: list[str], overrides: dict[str, str]) -> None:
    for key in overrides:
        scope, _, name = key.rpartition(".")
        if scope and scope not in algos:
            raise UserError(f"--hp {key}: '{scope}' is not among the sweep's algorithms")
        if not hp_owners(name, algos):  # any algorithm with the name: a scoped key's own check comes later
            raise UserError(f"--hp {key}: no algorithm in the sweep has a hyperparameter '{name}'")


def expand_algos(spec: str | list[str]) -> list[str]:
    names = spec if isinstance(spec, list) else [s for s in spec.replace(",", " ").split() if s]
    if names == ["all"]:
        return sorted(ALGORITHMS)
    for name in names:
        get_algorithm(name)
    return list(dict.fromkeys(names))


def read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    allowed = {"preset", "hp", "search", *GRID_KEYS, *SETTING_KEYS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    try:
        check_file_types(data)
    except UserError as exc:
        raise UserError(f"config file {path}: {exc}") from None
    return data


def check_file_types(data: dict[str, Any]) -> None:
    """A config file's values have the types the sweep expects (TOML is typed, but freely)."""
    for table in ("hp", "search"):
        if table in data and not isinstance(data[table], dict):
            raise UserError(f"{table} must be a table, e.g. [{table}] or [{table}.fedobp] (got {data[table]!r})")
    check_grid_types(data)
    check_setting_types({k: v for k, v in data.items() if k in SETTING_KEYS})


# Each list axis of the grid: what its items must be, and an example of a right value.
GRID_ITEMS = {
    "alphas": (is_number, "a list of numbers, e.g. [0.1, 0.5]"),
    "seeds": (is_integer, "a list of integers, e.g. [0, 1, 2]"),
    "datasets": (lambda item: isinstance(item, str), 'a list of names, e.g. ["digits"]'),
}


def check_grid_types(values: dict[str, Any]) -> None:
    """The grid's axes are non-empty lists of the right items (`algos` may also be one string), so
    `alphas = "0.1"` is a one-line error rather than a grid over the characters of a string."""
    for key, (accepts, what) in GRID_ITEMS.items():
        value = values.get(key)
        if key in values and not (isinstance(value, (list, tuple)) and value and all(map(accepts, value))):
            raise UserError(f"{key} must be {what} (got {value!r})")
    algos = values.get("algos")
    names = isinstance(algos, list) and algos and all(isinstance(a, str) for a in algos)
    if "algos" in values and not (isinstance(algos, str) or names):
        raise UserError(f'algos must be "all" or a list of names, e.g. ["fedavg", "fedper"] (got {algos!r})')


def flatten_hp(table: dict[str, Any]) -> dict[str, str]:
    """TOML `[hp]` (`key = v`) and `[hp.algo]` (`key = v`) tables as `--hp`-style strings."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": str(v) for k, v in value.items()})
        else:
            out[key] = str(value)
    return out


def build_plan(preset_name: str | None, config_file: Path | None, flags: dict[str, Any],
               hp_pairs: Iterable[str]) -> SweepPlan:
    """Merge, later winning: the preset, the config file, the flags the user gave."""
    from_file = read_toml(config_file) if config_file else {}
    merged = preset(preset_name or from_file.get("preset") or "quick")
    hp = flatten_hp(from_file.pop("hp", {}))
    search = from_file.pop("search", {})
    merged.update({k: v for k, v in from_file.items() if k != "preset"})
    merged.update(flags)
    check_grid_types(merged)
    settings = {k: merged[k] for k in SETTING_KEYS if k in merged}
    resolved_settings(settings)  # a bad setting is an error now, before anything starts
    algos = expand_algos(merged.get("algos", "all"))
    check_hp_keys(expand_algos(from_file.get("algos", "all")), hp)
    hp = {key: value for key, value in hp.items() if hp_owners(key, algos)}  # --algos may narrow the file's
    hp.update(parse_hp_pairs(hp_pairs))
    check_hp_keys(algos, hp)
    datasets = list(merged["datasets"])
    return SweepPlan(algos=algos, datasets=datasets, alphas=[float(a) for a in merged["alphas"]],
                     seeds=[int(s) for s in merged["seeds"]], settings=settings, hp=hp, search=search)


def check_datasets(datasets: list[str], data_root: Path) -> None:
    for name in datasets:
        if name not in BUILTIN_DATASETS and not (data_root / f"{name}.npz").exists():
            raise UserError(f"unknown dataset '{name}': no {data_root / (name + '.npz')} and not one of "
                            f"{', '.join(BUILTIN_DATASETS)}")


@dataclass
class SweepOutcome:
    """The grid's cells (`planned`), the records trained (`ran`) and the cells already recorded
    (`skipped`); a dry run trains nothing, so `ran` is empty and `to_train` is what it would train."""

    planned: list[RunConfig]
    ran: list[RunRecord]
    skipped: list[RunConfig]

    def to_train(self) -> list[RunConfig]:
        skipped = {c.run_id() for c in self.skipped}
        return [c for c in self.planned if c.run_id() not in skipped]

    def failed(self, results: Path) -> list[RunConfig]:
        return [c for c in self.planned if run_status(results, c.run_id()) == "failed"]

    def missing(self, results: Path) -> list[RunConfig]:
        return [c for c in self.planned if run_status(results, c.run_id()) is None]


def grid_configs(plan: SweepPlan, results: Path, tuned: bool = False) -> list[RunConfig]:
    """The plan's cells; `tuned`: with each algorithm's hyperparameters chosen by `pflbench tune`
    in the same results folder (:func:`pflbench.experiments.tuning.tuned_configs`)."""
    if not tuned:
        return plan.configs()
    from pflbench.experiments.tuning import tuned_configs

    return tuned_configs(plan, results)


def split_cells(configs: list[RunConfig], results: Path,
                retry_failed: bool = False) -> tuple[list[RunConfig], list[RunConfig]]:
    """(to train, already recorded): a cell is recorded when its record says ok, or failed
    unless `retry_failed`; a cell with no finished record (never run, or cut off) is trained."""
    recorded = {"ok", "failed"} if not retry_failed else {"ok"}
    done = [run_status(results, c.run_id()) in recorded for c in configs]
    return ([c for c, d in zip(configs, done) if not d], [c for c, d in zip(configs, done) if d])


def pending_summary(outcome: SweepOutcome, results: Path) -> list[str]:
    """A dry run's report: one line of counts, then per dataset x partition x alpha x seed the
    algorithms still to train ("all N" where none of the group's is recorded)."""
    todo = outcome.to_train()
    todo_ids = {c.run_id() for c in todo}
    failed = len(outcome.failed(results))
    lines = [f"{len(outcome.planned)} run(s) planned: {len(outcome.skipped)} recorded"
             f"{f' ({failed} failed)' if failed else ''}, {len(todo)} to train"]
    groups: dict[tuple, list[str]] = {}
    sizes: dict[tuple, int] = {}
    for c in outcome.planned:
        key = (c.dataset, c.partition, c.alpha, c.seed)
        sizes[key] = sizes.get(key, 0) + 1
        if c.run_id() in todo_ids:
            groups.setdefault(key, []).append(c.algo)
    for (dataset, partition, alpha, seed), algos in sorted(groups.items()):
        names = "" if len(algos) == sizes[(dataset, partition, alpha, seed)] else f": {', '.join(algos)}"
        every = "all " if not names else ""
        lines.append(f"  {dataset} {partition} alpha={alpha:g} seed={seed}: {every}{len(algos)} to train{names}")
    return lines


def run_sweep(plan: SweepPlan, results: Path, data_root: Path, executor: str = "local", workers: int = 1,
              device: str = "auto", plugins: Iterable[str] = (), retry_failed: bool = False,
              ray_address: str | None = None, tuned: bool = False, gpus_per_run: float | None = None,
              threads: int | None = None, on_start: Callable[[int, int], None] | None = None,
              on_record: Callable[[RunRecord], None] | None = None) -> SweepOutcome:
    """Run every cell without a record (and failed ones if `retry_failed`), writing each record
    as it arrives. `tuned`: the cells take each algorithm's hyperparameters chosen by `pflbench
    tune` in the same results folder (:func:`pflbench.experiments.tuning.tuned_configs`)."""
    check_datasets(plan.datasets, data_root)
    configs = grid_configs(plan, results, tuned)
    remove_stale_staging(results)
    todo, skipped = split_cells(configs, results, retry_failed)
    if on_start:
        on_start(len(todo), len(skipped))
    cache = Path(results) / ".cache" / "partitions"
    cells = [Cell(config=c, data_root=str(data_root), device=device, plugins=tuple(map(str, plugins)),
                  cache_dir=str(cache)) for c in todo]
    ran = []
    for record in make_executor(executor, workers, ray_address, gpus_per_run, threads).run(cells):
        write_run(results, record)
        ran.append(record)
        if on_record:
            on_record(record)
    return SweepOutcome(planned=configs, ran=ran, skipped=skipped)

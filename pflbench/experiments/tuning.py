"""Equal-budget tuning on validation data (`pflbench tune`), and the tuned cells of a sweep.

One Optuna study per (algorithm, dataset, partition, alpha, protocol). Each trial draws the
algorithm's declared search space (:mod:`pflbench.core.search`) and the run's learning rate, runs
one ordinary run record per tuning seed with a validation split carved out of the clients'
training data, and scores the mean final validation accuracy over those seeds. Test data is
never read by the objective, so a choice made here can be reported on test data honestly.

Fairness and reproducibility:
- Every study of a grid gets the same budget of finished trials; a trial whose run fails (a
  diverging learning rate) is told to Optuna as failed and counts. Trial 0 is the algorithm's
  defaults (enqueued), so the report can say how far tuning moved from them.
- The sampler is TPE, seeded per trial from the study's name and the trial's number and rebuilt
  before each trial: a trial's parameters are a function of the finished trials before it, not
  of how many processes ran or were killed. They are drawn whole and enqueued in one write, so a
  kill while they are stored leaves nothing half-drawn. The first `studies.STARTUP_TRIALS` trials
  (the default included) are drawn at random, as TPE needs a few points before it models anything.
- Studies live in SQLite under `<results>/tuning/` (:mod:`pflbench.experiments.studies`) and their run records
  under `<results>/tuning/runs/`: a `tune` killed at any moment resumes the trial it was running
  (same parameters; its finished runs are not repeated) and never repeats a finished trial.
- A study asks one trial at a time, so its sequence does not depend on the worker count; the
  trials of all studies of a wave run through the sweep's executors (local processes or Ray).
- The choice at budget N is the best of the study's first N finished trials (the earliest on a
  tie), so extending a study to a larger budget never changes the choice at a smaller one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from pflbench.core.registry import get_algorithm, recorded_hyperparams, resolve_hyperparams
from pflbench.core.search import Real, Space, override, search_space
from pflbench.errors import UserError
from pflbench.experiments.config import RunConfig, protocol_key, resolved_settings, without_later_defaults
from pflbench.experiments.executors import Cell, make_executor
from pflbench.experiments.records import read_summary, remove_stale_staging, run_dir, write_run
from pflbench.experiments.studies import (TUNING, import_optuna, finished, load_study, open_storage, optuna_attrs,
                                         sampler_for, study_rows, write_tables)

LR = "lr"
DEFAULT_VAL_RATIO = 0.1
DEFAULT_TUNE_SEEDS = (1000,)
LR_SPACE_NOTE = "log scale, a decade either side of the grid's --lr"


def lr_space(grid_lr: float) -> Real:
    return Real(grid_lr / 10, grid_lr * 10, log=True)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def study_spaces(algo: str, grid_lr: float, search: dict[str, Any]) -> dict[str, Space]:
    """The learning rate's space and the algorithm's declared spaces, with the user's `[search]`
    overrides: top-level keys apply to every algorithm that has them, `[search.ALGO]` to one."""
    cls = get_algorithm(algo)
    known = {f.name for f in dataclasses.fields(cls.Hyperparams)} | {LR}
    spaces: dict[str, Space] = {LR: lr_space(grid_lr), **search_space(cls.Hyperparams)}
    mine = {k: v for k, v in search.items() if not isinstance(v, dict) and k in known}
    table = search.get(algo, {})
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"[search.{algo}] {', '.join(unknown)}: {algo} has no such hyperparameter "
                        f"(it has: {', '.join(sorted(known))})")
    for key, value in {**mine, **table}.items():
        spaces[key] = override(spaces.get(key), value, where=f"[search.{algo}] {key}" if key in table else
                               f"[search] {key}")
    return spaces


def check_search_table(search: dict[str, Any], algos: list[str]) -> None:
    """Every `[search]` key names a hyperparameter of some algorithm of the grid (or `lr`)."""
    for key, value in search.items():
        if isinstance(value, dict):
            if key not in algos:
                raise UserError(f"[search.{key}]: '{key}' is not among the grid's algorithms")
            continue
        owners = [a for a in algos if key in {f.name for f in dataclasses.fields(get_algorithm(a).Hyperparams)}]
        if key != LR and not owners:
            raise UserError(f"[search] {key}: no algorithm in the grid has a hyperparameter '{key}'")


def suggest_all(trial: Any, spaces: dict[str, Space]) -> dict[str, Any]:
    return {name: space.suggest(trial, name) for name, space in spaces.items()}


@dataclass
class StudySpec:
    """One study: the cell it tunes for, how trials are scored, and what they search."""

    algo: str
    dataset: str
    alpha: float
    settings: dict[str, Any]
    base_hp: dict[str, Any]
    spaces: dict[str, Space]
    tune_seeds: tuple[int, ...]
    val_ratio: float

    @property
    def partition_label(self) -> str:
        return f"a{self.alpha:g}" if self.settings.get("partition", "dirichlet") == "dirichlet" \
            else self.settings["partition"]

    @property
    def protocol(self) -> str:
        return protocol_key(self.settings)

    @property
    def name(self) -> str:
        """Readable, and unique for everything that changes a trial's score. A setting added after
        studies were committed is left out at its default, as in run ids, so a `tune` extends a
        committed study instead of starting another beside it (val_ratio predates the studies)."""
        settings = without_later_defaults(self.settings, keep=("val_ratio",))
        identity = {"algo": self.algo, "dataset": self.dataset, "alpha": self.alpha, "settings": settings,
                    "hp": self.base_hp, "spaces": {k: repr(v) for k, v in self.spaces.items()},
                    "seeds": list(self.tune_seeds), "val_ratio": self.val_ratio}
        return f"{self.algo}-{self.dataset}-{self.partition_label}-{_digest(identity)[:10]}"

    def configs(self, values: dict[str, Any]) -> list[RunConfig]:
        """The trial's runs, one per tuning seed (bad hyperparameters raise a UserError)."""
        cls = get_algorithm(self.algo)
        hp = {**self.base_hp, **{k: v for k, v in values.items() if k != LR}}
        resolved = recorded_hyperparams(resolve_hyperparams(cls, hp))
        settings = {**self.settings, LR: values.get(LR, self.settings.get(LR, RunConfig.lr)),
                    "val_ratio": self.val_ratio}
        return [RunConfig(algo=self.algo, dataset=self.dataset, alpha=self.alpha, seed=s, hp=resolved, **settings)
                for s in self.tune_seeds]

    def default_params(self) -> dict[str, Any]:
        """Trial parameters that stand for the defaults (the grid's lr, the declared defaults)."""
        defaults = {**dataclasses.asdict(get_algorithm(self.algo).Hyperparams()), **self.base_hp,
                    LR: self.settings.get(LR, RunConfig.lr)}
        params: dict[str, Any] = {}
        for name, space in self.spaces.items():
            params.update(space.params(name, defaults[name]))
        return params

    def attrs(self) -> dict[str, Any]:
        return {"algo": self.algo, "dataset": self.dataset, "alpha": self.alpha,
                "partition": self.settings.get("partition", "dirichlet"), "protocol": self.protocol,
                "settings": self.settings, "base_hp": self.base_hp, "tune_seeds": list(self.tune_seeds),
                "val_ratio": self.val_ratio, "spaces": {k: v.describe() for k, v in self.spaces.items()}}


def study_specs(plan: Any, tune_seeds: Iterable[int], val_ratio: float) -> list[StudySpec]:
    """One spec per (dataset, alpha, algorithm) of a sweep plan."""
    from pflbench.experiments.sweep import hp_for

    seeds = tuple(int(s) for s in tune_seeds)
    if not seeds:
        raise UserError("--tune-seeds needs at least one seed")
    if not 0 < val_ratio < 1:
        raise UserError(f"--val-ratio must be in (0, 1) when tuning (got {val_ratio}); 0.1 is the default")
    check_search_table(plan.search, plan.algos)
    settings = resolved_settings(plan.settings)
    grid_lr = float(settings.get(LR, RunConfig.lr))
    specs = []
    for dataset in plan.datasets:
        for alpha in plan.alphas:
            for algo in plan.algos:
                spaces = study_spaces(algo, grid_lr, plan.search)
                fixed = plan_hp_keys(algo, plan.hp)  # a value the user fixed is not searched
                base = {k: v for k, v in hp_for(algo, plan.hp).items() if k in fixed}
                spaces = {k: v for k, v in spaces.items() if k not in fixed}
                specs.append(StudySpec(algo, dataset, float(alpha), settings, base, spaces, seeds, val_ratio))
    return specs


def plan_hp_keys(algo: str, overrides: dict[str, str]) -> set[str]:
    """The hyperparameters the user fixed for `algo` with `--hp` or `[hp]`."""
    names = {f.name for f in dataclasses.fields(get_algorithm(algo).Hyperparams)}
    keys = set()
    for key in overrides:
        scope, _, name = key.rpartition(".")
        if (scope == algo or not scope) and name in names:
            keys.add(name)
    return keys


@dataclass
class PendingTrial:
    study: Any
    spec: StudySpec
    trial: Any
    values: dict[str, Any]
    configs: list[RunConfig]
    error: str | None = None


def draw_values(study: Any, spec: StudySpec, number: int) -> dict[str, Any]:
    """What the sampler seeded for trial `number` draws after the study's finished trials, drawn on
    an in-memory copy so nothing is stored until the whole draw is known."""
    optuna = import_optuna()
    scratch = optuna.create_study(direction="maximize", sampler=sampler_for(spec.name, number))
    scratch.add_trials([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    return suggest_all(scratch.ask(), spec.spaces)


def next_trial(study: Any, spec: StudySpec, budget: int) -> PendingTrial | None:
    """The trial a killed `tune` left running (same parameters), else a new one; None when the
    study has its budget.

    A new trial's values are drawn in full first and enqueued in one write, and the trial is then
    asked for them as fixed parameters: a kill while its parameters are being stored one by one
    cannot change what the resumed trial gets (drawing on the stored trial itself would hand the
    resumed one the sampler's first draws for the parameters not yet stored)."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if len(finished(trials)) >= budget:
        return None
    running = [t for t in trials if t.state == TrialState.RUNNING]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the defaults may sit outside a narrowed space
        if running:  # its values are fixed; the seeded sampler serves one stored without them (older code)
            study.sampler = sampler_for(spec.name, running[0].number)
            trial = optuna.trial.Trial(study, running[0]._trial_id)
        else:
            if not any(t.state == TrialState.WAITING for t in trials):  # the defaults wait as trial 0
                study.enqueue_trial(draw_values(study, spec, len(trials)))
            trial = study.ask()
        values = suggest_all(trial, spec.spaces)
    trial.set_user_attr("values", values)
    try:
        configs = spec.configs(values)
    except UserError as exc:  # hyperparameters the algorithm rejects: a failed trial
        return PendingTrial(study, spec, trial, values, [], error=str(exc))
    trial.set_user_attr("run_ids", [c.run_id() for c in configs])
    return PendingTrial(study, spec, trial, values, configs)


def _record_outcome(root: Path, config: RunConfig) -> tuple[float | None, str | None]:
    """(final validation accuracy, error) of a written record."""
    summary = read_summary(run_dir(root, config.run_id()) / "summary.json")
    if summary.get("status") != "ok":
        return None, summary.get("error", "failed")
    return float(summary["val_acc"]), None


def tell(pending: PendingTrial, root: Path) -> float | None:
    """Score a trial whose runs are recorded: the mean final validation accuracy, or failed."""
    from optuna.trial import TrialState

    error = pending.error
    scores = []
    if error is None:
        for config in pending.configs:
            score, error = _record_outcome(root, config)
            if error is not None:
                break
            scores.append(score)
    if error is not None:
        pending.trial.set_user_attr("error", error)
        pending.study.tell(pending.trial.number, state=TrialState.FAIL)
        return None
    value = sum(scores) / len(scores)
    pending.study.tell(pending.trial.number, value)
    return value


def run_tuning(plan: Any, budget: int, tune_seeds: Iterable[int], val_ratio: float, results: Path,
               data_root: Path, executor: str = "local", workers: int = 1, device: str = "auto",
               plugins: Iterable[str] = (), ray_address: str | None = None, gpus_per_run: float | None = None,
               threads: int | None = None, on_trial: Callable[[PendingTrial, float | None], None] | None = None) -> pd.DataFrame:
    """Bring every study of the plan to `budget` finished trials; returns the choices."""
    from pflbench.experiments.sweep import check_datasets

    if budget < 1:
        raise UserError(f"--budget must be >= 1 (got {budget})")
    check_datasets(plan.datasets, data_root)
    specs = study_specs(plan, tune_seeds, val_ratio)
    storage = open_storage(results)
    studies = [(spec, load_study(storage, spec, budget)) for spec in specs]
    root = Path(results) / TUNING
    remove_stale_staging(root)
    cache = Path(results) / ".cache" / "partitions"
    runner = make_executor(executor, workers, ray_address, gpus_per_run, threads)
    while True:
        wave = [p for p in (next_trial(study, spec, budget) for spec, study in studies) if p is not None]
        if not wave:
            break
        todo = {c.run_id(): c for p in wave for c in p.configs if not (run_dir(root, c.run_id()) / "summary.json").exists()}
        cells = [Cell(config=c, data_root=str(data_root), device=device, plugins=tuple(map(str, plugins)),
                      cache_dir=str(cache)) for c in todo.values()]
        for record in runner.run(cells):
            write_run(root, record)
        for pending in wave:
            value = tell(pending, root)
            if on_trial:
                on_trial(pending, value)
        write_tables(results)
    return write_tables(results)


def tuned_configs(plan: Any, results: Path) -> list[RunConfig]:
    """The sweep's cells with each algorithm's chosen hyperparameters: the study of the same
    algorithm, dataset, partition, alpha and protocol, complete at its budget; the sweep's seeds
    must not be tuning seeds."""
    if plan.hp:
        raise UserError("--hp does not combine with --tuned: fix a value in the tuning instead "
                        "([search.ALGO] KEY = value in the config, then `pflbench tune`)")
    storage = open_storage(results, create=False)
    chosen, _ = study_rows(storage)
    settings = resolved_settings(plan.settings)
    protocol = protocol_key(settings)
    partition = settings.get("partition", "dirichlet")
    configs = []
    for dataset in plan.datasets:
        for alpha in plan.alphas:
            for algo in plan.algos:
                where = f"{algo} on {dataset} alpha={alpha:g}"
                found = [c for c in chosen if c["algo"] == algo and c["dataset"] == dataset and c["alpha"] == alpha
                         and c["partition"] == partition and c["protocol"] == protocol]
                if not found:
                    raise UserError(f"no tuning study for {where} under this sweep's settings; run `pflbench tune` "
                                    "with the same settings first")
                if len(found) > 1:
                    raise UserError(f"{len(found)} tuning studies match {where} ({', '.join(c['study'] for c in found)}); "
                                    "keep one per results folder")
                study = found[0]
                if study["finished"] < study["budget"]:
                    raise UserError(f"study {study['study']} has {study['finished']} of {study['budget']} trials; "
                                    "finish it with `pflbench tune` first")
                if not study["chosen"]:
                    raise UserError(f"every trial of study {study['study']} failed; widen or move its search space")
                overlap = sorted(set(plan.seeds) & set(json.loads(study["tune_seeds"])))
                if overlap:
                    raise UserError(f"seed(s) {', '.join(map(str, overlap))} tuned {where}; final seeds must differ "
                                    "from tuning seeds (pick other --seeds)")
                values = json.loads(study["chosen"])
                spec_attrs = optuna_attrs(storage, study["study"])
                hp = {**spec_attrs["base_hp"], **{k: v for k, v in values.items() if k != LR}}
                resolved = recorded_hyperparams(resolve_hyperparams(get_algorithm(algo), hp))
                lr = values.get(LR, settings.get(LR, RunConfig.lr))
                final = {**settings, LR: lr, "tuned_budget": int(study["budget"]), "tuned_study": study["study"]}
                configs += [RunConfig(algo=algo, dataset=dataset, alpha=alpha, seed=s, hp=resolved, **final)
                            for s in plan.seeds]
    return configs

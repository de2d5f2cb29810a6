"""The Python API: what the CLI does, as functions a notebook can call.

    import pflbench
    result = pflbench.run("fedper", dataset="digits", alpha=0.1, rounds=10)
    result.summary["acc"], result.rounds      # a dict and pandas DataFrames
    board = pflbench.sweep(algos="fedavg,fedper", alphas=[0.1, 0.5], results="results")
    pflbench.leaderboard("results"); pflbench.compare("fedper", "fedavg", results="results")

Every function validates its arguments as the CLI does and raises
:class:`pflbench.UserError` with the same one-line message (the CLI prints it and exits 2).
The CLI (:mod:`pflbench.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from pflbench.core.data import data_root as resolve_data_root
from pflbench.core.registry import ALGORITHMS, get_algorithm, load_algorithms, recorded_hyperparams, resolve_hyperparams
from pflbench.errors import UserError
from pflbench.experiments.config import RunConfig, check_seed, resolved_settings
from pflbench.experiments.folders import check_output_folder

PathLike = str | os.PathLike
WarnFn = Callable[[str], None]


def _python_warning(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def eval_every_warnings(settings: dict[str, Any]) -> list[str]:
    """The last round is always evaluated, so --eval-every beyond --rounds is allowed, but it is
    likely a slip (no curve over rounds): say so once."""
    every, rounds = settings["eval_every"], settings["rounds"]
    return [f"--eval-every {every} > --rounds {rounds}: only the last round is evaluated"] if every > rounds else []


def resolve_workers(workers: int | None, threads: int | None = None) -> int:
    """`workers` as given, checked before anything starts, or half the CPUs when None
    (0 is a mistake, not a request for the default); `threads` per run is checked here too."""
    from pflbench.experiments.executors import check_workers, default_workers, threads_per_run

    threads_per_run(1, threads)
    if workers is None:
        return default_workers()
    check_workers(workers)
    return workers


@dataclass
class RunResult:
    """One run: its resolved config, its summary, one row per evaluation (`rounds`) and per client
    and evaluation (`clients`), and the record's folder when it was written (`path`)."""

    config: RunConfig
    summary: dict[str, Any]
    rounds: pd.DataFrame
    clients: pd.DataFrame
    path: Path | None = None


def make_config(algo: str = "fedavg", dataset: str = "digits", alpha: float = 0.1, seed: int = 0,
                hp: dict[str, Any] | None = None, **settings: Any) -> RunConfig:
    """A RunConfig with the algorithm's hyperparameters resolved and typed (defaults included);
    an unknown setting or hyperparameter is a UserError naming the known ones."""
    cls = get_algorithm(algo)
    hyperparams = resolve_hyperparams(cls, dict(hp or {}))
    return RunConfig.from_dict({"algo": algo, "dataset": dataset, "alpha": alpha, "seed": seed,
                                "hp": recorded_hyperparams(hyperparams), **settings})


def run(algo: str = "fedavg", dataset: str = "digits", alpha: float = 0.1, *, seed: int = 0,
        hp: dict[str, Any] | None = None, results: PathLike | None = None, data_root: PathLike | None = None,
        device: str = "auto", plugins: Iterable[PathLike] = (),
        progress: Callable[[int, dict[str, float] | None], None] | None = None, on_warning: WarnFn | None = None,
        **settings: Any) -> RunResult:
    """Train one run. `settings` are the run flags (`rounds=10`, `clients=20`, `lr=0.05`, ...);
    `hp` the algorithm's hyperparameters. With `results=DIR` the record is written exactly as
    `pflbench run` writes it and `path` is its folder; without, nothing is written. A diverging
    run raises UserError naming the round (and, with `results`, leaves a failed record)."""
    from pflbench.experiments.records import read_summary
    from pflbench.experiments.runner import compute_run, execute

    load_algorithms([str(p) for p in plugins])
    config = make_config(algo, dataset, alpha, seed, hp, **settings)
    if results is not None:
        check_output_folder(Path(results))
    for message in eval_every_warnings(config.to_dict()):
        (on_warning or _python_warning)(message)
    root = resolve_data_root(data_root)
    if results is None:
        try:
            record = compute_run(config, root, device, (), progress)
        except FloatingPointError as exc:  # a diverging run: the engine's message names the round
            raise UserError(str(exc)) from None
        return RunResult(config, record.summary, pd.DataFrame(record.rounds), pd.DataFrame(record.clients))
    path = execute(config, Path(results), root, device, [str(p) for p in plugins], progress)
    return RunResult(config, read_summary(path / "summary.json"), pd.read_csv(path / "rounds.csv"),
                     pd.read_csv(path / "clients.csv"), path)


def _check_workers_can_import(algos: list[str], workers: int, executor: str) -> None:
    """A class defined in a notebook (module `__main__`) cannot be imported by worker processes."""
    local = [a for a in algos if ALGORITHMS[a].__module__ == "__main__"]
    if local and (workers > 1 or executor != "local"):
        raise UserError(f"{', '.join(local)} is defined in __main__ (a notebook or script), which worker processes "
                        "cannot import; use workers=1, or move it to a file and pass plugins=[path]")


@dataclass
class SweepResult:
    """What a sweep did: the planned cells, those it trained and skipped, and the leaderboard."""

    outcome: Any
    board: pd.DataFrame
    report: Path | None


def sweep_outcome(algos: str | list[str] | None = None, *, datasets: list[str] | None = None,
                  alphas: list[float] | None = None, seeds: list[int] | None = None, preset: str | None = None,
                  config: PathLike | None = None, hp: dict[str, Any] | list[str] | None = None,
                  results: PathLike = "results", reports: PathLike | None = "reports",
                  data_root: PathLike | None = None, workers: int | None = 1, executor: str = "local",
                  ray_address: str | None = None, device: str = "auto", plugins: Iterable[PathLike] = (),
                  retry_failed: bool = False, tuned: bool = False, gpus_per_run: float | None = None,
                  threads: int | None = None, on_start: Callable[[int, int], None] | None = None,
                  on_record: Callable[[Any], None] | None = None, on_warning: WarnFn | None = None,
                  **settings: Any) -> SweepResult:
    """`sweep`, returning the outcome (cells trained, skipped, failed) with the leaderboard."""
    from pflbench.analysis.leaderboard import load_runs, long_leaderboard, write_leaderboards
    from pflbench.analysis.report import build_report
    from pflbench.experiments.sweep import run_sweep

    workers = resolve_workers(workers, threads)
    plugins = [str(p) for p in plugins]
    plan = _sweep_plan(algos, datasets, alphas, seeds, preset, config, hp, plugins, on_warning, settings)
    _check_workers_can_import(plan.algos, workers, executor)
    results = Path(results)
    check_output_folder(results)
    if reports is not None:
        check_output_folder(Path(reports), "--reports")
    for message in eval_every_warnings(resolved_settings(plan.settings)):
        (on_warning or _python_warning)(message)
    if tuned:  # a missing or unfinished study fails before anything starts
        from pflbench.experiments.tuning import tuned_configs

        tuned_configs(plan, results)
    outcome = run_sweep(plan, results, resolve_data_root(data_root), executor, workers, device, plugins,
                        retry_failed, ray_address, tuned, gpus_per_run, threads, on_start=on_start, on_record=on_record)
    page = build_report(results, Path(reports)) if reports is not None else None
    board = long_leaderboard(load_runs(results))
    if page is None:
        write_leaderboards(results, board)
    return SweepResult(outcome, board, page)


def _sweep_plan(algos: str | list[str] | None, datasets: list[str] | None, alphas: list[float] | None,
                seeds: list[int] | None, preset: str | None, config: PathLike | None,
                hp: dict[str, Any] | list[str] | None, plugins: list[str], on_warning: WarnFn | None,
                settings: dict[str, Any]) -> Any:
    """The grid a sweep covers (preset, then file, then flags), every cell's settings checked."""
    from pflbench.experiments.sweep import build_plan

    for message in load_algorithms(plugins):
        (on_warning or _python_warning)(message)
    grid = {"algos": algos, "alphas": alphas, "datasets": datasets, "seeds": seeds}
    flags = {k: v for k, v in {**grid, **settings}.items() if v is not None}
    plan = build_plan(preset, Path(config) if config else None, flags, _hp_pairs(hp))
    plan.configs()  # every cell's settings are checked before anything is written
    return plan


def sweep_status(algos: str | list[str] | None = None, *, datasets: list[str] | None = None,
                 alphas: list[float] | None = None, seeds: list[int] | None = None, preset: str | None = None,
                 config: PathLike | None = None, hp: dict[str, Any] | list[str] | None = None,
                 results: PathLike = "results", plugins: Iterable[PathLike] = (), retry_failed: bool = False,
                 tuned: bool = False, on_warning: WarnFn | None = None, **settings: Any) -> Any:
    """What `sweep` with the same arguments would train, without training or writing anything:
    the outcome's `planned` cells, `skipped` (already recorded) and `to_train()`. A long grid
    filled across sessions uses it to see how far it has come."""
    from pflbench.experiments.sweep import SweepOutcome, grid_configs, split_cells

    plan = _sweep_plan(algos, datasets, alphas, seeds, preset, config, hp, [str(p) for p in plugins],
                       on_warning, settings)
    results = Path(results)
    configs = grid_configs(plan, results, tuned)
    _, recorded = split_cells(configs, results, retry_failed)
    return SweepOutcome(planned=configs, ran=[], skipped=recorded)


def _hp_pairs(hp: dict[str, Any] | list[str] | None) -> list[str]:
    """`{KEY or ALGO.KEY: value}` (Python) or `["KEY=VALUE"]` (the CLI's --hp) as --hp pairs."""
    if hp is None:
        return []
    return list(hp) if isinstance(hp, list) else [f"{k}={v}" for k, v in hp.items()]


def sweep(algos: str | list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
    """Train every cell of the grid not yet recorded in `results` (see `pflbench sweep`), rebuild
    the leaderboards (and the report, unless `reports=None`) and return the long leaderboard.
    Keywords: datasets, alphas, seeds, preset, config (a TOML path), hp (`{KEY or ALGO.KEY:
    value}`), results, reports, data_root, workers (default 1), executor, ray_address, gpus_per_run
    (Ray on CUDA: the GPU share of each run, default 1 / workers), threads (torch threads per run,
    default CPUs / workers), device, plugins, retry_failed, tuned, and any run setting (`rounds=5`, `clients=20`, ...)."""
    return sweep_outcome(algos, **kwargs).board


def tune(budget: int, algos: str | list[str] | None = None, *, tune_seeds: Iterable[int] = (1000,),
         val_ratio: float = 0.1, datasets: list[str] | None = None, alphas: list[float] | None = None,
         preset: str | None = None, config: PathLike | None = None, hp: dict[str, Any] | None = None,
         results: PathLike = "results", data_root: PathLike | None = None, workers: int | None = 1,
         executor: str = "local", ray_address: str | None = None, device: str = "auto",
         plugins: Iterable[PathLike] = (), gpus_per_run: float | None = None, threads: int | None = None,
         on_trial: Callable[..., None] | None = None, on_warning: WarnFn | None = None, **settings: Any) -> pd.DataFrame:
    """Tune every algorithm of the grid with `budget` trials on validation data (see
    `pflbench tune`); returns one row per study with its chosen values."""
    from pflbench.experiments.tuning import run_tuning

    workers = resolve_workers(workers, threads)
    plugins = [str(p) for p in plugins]
    plan = _sweep_plan(algos, datasets, alphas, None, preset, config, hp, plugins, on_warning, settings)
    for seed in tune_seeds or ():
        check_seed(seed)
    _check_workers_can_import(plan.algos, workers, executor)
    check_output_folder(Path(results))
    for message in eval_every_warnings(resolved_settings(plan.settings)):
        (on_warning or _python_warning)(message)
    return run_tuning(plan, budget, tune_seeds, val_ratio, Path(results), resolve_data_root(data_root), executor,
                      workers, device, plugins, ray_address, gpus_per_run, threads, on_trial=on_trial)


def _stored_runs(results: PathLike) -> pd.DataFrame:
    from pflbench.analysis.leaderboard import load_runs

    if not (Path(results) / "runs").is_dir():
        raise UserError(f"no runs in {results}; run `pflbench sweep` first or pass --results DIR")
    return load_runs(Path(results))


def leaderboard(results: PathLike = "results") -> pd.DataFrame:
    """The long leaderboard of the stored runs (one row per dataset, partition, alpha, algorithm,
    hyperparameters and protocol; see the README's "Output files")."""
    from pflbench.analysis.leaderboard import long_leaderboard

    return long_leaderboard(_stored_runs(results))


def compare(a: str, b: str, results: PathLike = "results", dataset: str | None = None,
            alphas: list[float] | None = None) -> pd.DataFrame:
    """A minus B, paired by seed and client, in every cell where both ran (see `pflbench compare`)."""
    from pflbench.analysis.statistics import FINE_TUNED, compare as compare_entries, final_clients, with_fine_tuned

    runs = _stored_runs(results)
    runs = runs[runs["status"] == "ok"] if len(runs) else runs
    if dataset is not None:
        runs = runs[runs["dataset"] == dataset]
    if alphas:
        runs = runs[runs["alpha"].isin(alphas)]
    if runs.empty:
        raise UserError(f"no finished runs in {results} match --dataset/--alpha")
    rows = final_clients(runs)
    if any(name.endswith(FINE_TUNED) for name in (a, b)):
        rows = with_fine_tuned(rows, final_clients(runs, "_ft"))
    try:
        return compare_entries(rows, a, b)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def report(results: PathLike = "results", reports: PathLike = "reports") -> Path:
    """Rebuild every leaderboard CSV, plot and the report page from stored runs; returns the page."""
    from pflbench.analysis.report import build_report

    check_output_folder(Path(results), create=False)  # the leaderboards are written there
    _stored_runs(results)
    check_output_folder(Path(reports), "--reports")
    return build_report(Path(results), Path(reports))


__all__ = ["RunResult", "SweepResult", "make_config", "run", "sweep", "sweep_outcome", "tune", "leaderboard",
           "compare", "report"]

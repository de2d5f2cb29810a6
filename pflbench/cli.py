"""The `pflbench` command line: `run` one experiment, `list` what is available.

A user's mistake (a :class:`UserError`) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pflbench.core.data import available_datasets, data_root
from pflbench.errors import UserError
from pflbench.core.models import MODELS
from pflbench.core.search import search_space, show_value
from pflbench.experiments.tuning import LR_SPACE_NOTE
from pflbench.experiments.options import given, with_run_flags
from pflbench.core.registry import ALGORITHMS, hyperparam_defaults, load_algorithms, parse_hp_pairs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pflbench: a benchmark harness for personalized federated learning.")


# Options that several commands take, declared once so their flags and help read the same.
ALGOS_OPTION = typer.Option(None, help="all, or algorithms separated by commas or spaces [default: all].")
ALPHAS_OPTION = typer.Option(None, help="Dirichlet alphas, e.g. --alpha 0.1 0.5.")
DATASETS_OPTION = typer.Option(None, help="Datasets, e.g. --datasets mnist fmnist.")
PLUGINS_OPTION = typer.Option(None, help="Python file or folder with extra algorithms (repeatable).")
WORKERS_OPTION = typer.Option(None, help="Runs at once [default: half the CPUs, at least 1].")
THREADS_OPTION = typer.Option(None, help="Torch threads per run [default: CPUs / workers]; e.g. 1 to leave "
                                          "cores free for other work.")
EXECUTOR_OPTION = typer.Option("local", help="local (processes on this machine) or ray.")
RAY_ADDRESS_OPTION = typer.Option(None, help="Ray cluster address [default: start a local Ray].")
GPUS_PER_RUN_OPTION = typer.Option(None, help="With --executor ray on CUDA: the GPU share each run "
                                               "asks Ray for [default: 1 / workers].")
DATA_ROOT_OPTION = typer.Option(None, "--data-root", help="Folder of dataset .npz files.")
DEVICE_OPTION = typer.Option("auto", help="auto, cpu or cuda.")


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"pflbench: error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def warn(warnings: list[str]) -> None:
    for warning in warnings:
        warn_one(warning)


def warn_one(warning: str) -> None:
    typer.echo(f"pflbench: warning: {warning}", err=True)


class RoundProgress:
    """A progress bar over rounds that shows the latest accuracy."""

    def __init__(self, rounds: int, label: str):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[acc]}"), TimeElapsedColumn(),
                            console=None, transient=False)
        self.task = self.bar.add_task(label, total=rounds, acc="")

    def __enter__(self) -> "RoundProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, round_: int, figures: dict[str, float] | None) -> None:
        fields = {"acc": f"acc {figures['acc']:.2f}%"} if figures else {}
        self.bar.update(self.task, completed=round_, **fields)


class SweepProgress:
    """A progress bar over the sweep's runs and a line per finished run. The bar appears when the
    sweep starts, so a mistake found while planning prints its one line alone."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.bar.add_task("sweep", total=0)
        self.started = False

    def __enter__(self) -> "SweepProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.bar.__exit__(*exc)

    def start(self, todo: int, done: int) -> None:
        self.bar.__enter__()
        self.started = True
        self.bar.update(self.task, total=todo)
        self.bar.console.print(f"{todo} run(s) to train, {done} already recorded")

    def record(self, record: Any) -> None:
        c, s = record.config, record.summary
        what = f"{c.algo:<10} {c.dataset} alpha={c.alpha:g} seed={c.seed}"
        if record.ok:
            line = f"done   {what}: acc {s['acc']:.2f}% ({s['wall_s']:.1f}s)"
        else:
            line = f"FAILED {what}: {record.error}"
        self.bar.console.print(line)
        self.bar.advance(self.task)


def run(
    algo: str = typer.Option("fedavg", help="Algorithm (see `pflbench list`)."),
    dataset: str = typer.Option("digits", help="Dataset name, or the stem of a .npz in the data root."),
    alpha: float = typer.Option(0.1, help="Dirichlet concentration; lower is more skewed."),
    seed: int = typer.Option(0, help="Seed of the partition, initialization, sampling and batches."),
    hp: Optional[List[str]] = typer.Option(None, help="Algorithm hyperparameter KEY=VALUE (repeatable)."),
    plugin: Optional[List[str]] = PLUGINS_OPTION,
    data_root_: Optional[Path] = typer.Option(None, "--data-root", help="Folder of dataset .npz files "
                                              "[default: $PFLBENCH_DATA or ./datasets]."),
    results: Path = typer.Option(Path("results"), help="Results folder; the run goes to DIR/runs/<run_id>/."),
    device: str = DEVICE_OPTION,
    **flags: Any,
) -> None:
    """Train one federated run and write its record."""
    from pflbench import api

    warn(load_algorithms(plugin or ()))
    hp_values = parse_hp_pairs(hp or [])
    rounds = api.make_config(algo, dataset, alpha, seed, hp_values, **flags).rounds
    with RoundProgress(rounds, f"{algo} {dataset}") as progress:
        result = api.run(algo, dataset, alpha, seed=seed, hp=hp_values, results=results, data_root=data_root_,
                         device=device, plugins=plugin or (), progress=progress, on_warning=warn_one, **flags)
    s = result.summary
    ft = f", acc_ft {s['acc_ft']:.2f}%" if "acc_ft" in s else ""
    new = ""
    if "acc_new" in s:  # holdout clients: how newcomers fare
        new_ft = f", after fine-tuning {s['acc_new_ft']:.2f}%" if "acc_new_ft" in s else ""
        new = f"newcomers {s['acc_new']:.2f}%{new_ft}, "
    typer.echo(f"{result.config.run_id()}: acc {s['acc']:.2f}% (best {s['best_acc']:.2f}%{ft}), "
               f"client mean {s['acc_client_mean']:.2f}%, p10 {s['acc_client_p10']:.2f}%, {new}"
               f"{s['wall_s']:.1f}s -> {result.path}")


app.command()(user_errors(with_run_flags(run)))


def sweep(
    algos: Optional[str] = ALGOS_OPTION,
    alpha: Optional[List[float]] = ALPHAS_OPTION,
    datasets: Optional[List[str]] = DATASETS_OPTION,
    seeds: Optional[List[int]] = typer.Option(None, help="Seeds, e.g. --seeds 0 1 2."),
    preset: Optional[str] = typer.Option(None, help="quick (default: offline digits, minutes) or fedobp (the paper's protocol)."),
    config: Optional[Path] = typer.Option(None, help="TOML file with the same settings (flags override it)."),
    hp: Optional[List[str]] = typer.Option(None, help="KEY=VALUE for every algorithm that has KEY, or ALGO.KEY=VALUE."),
    plugin: Optional[List[str]] = PLUGINS_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    executor: str = EXECUTOR_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    gpus_per_run: Optional[float] = GPUS_PER_RUN_OPTION,
    retry_failed: bool = typer.Option(False, help="Run cells again whose record says failed."),
    tuned: bool = typer.Option(False, help="Use each algorithm's hyperparameters chosen by `pflbench tune` "
                               "(same settings and --results; seeds must differ from the tuning seeds)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say which runs the sweep would train and how many "
                                 "are recorded; train and write nothing."),
    data_root_: Optional[Path] = DATA_ROOT_OPTION,
    results: Path = typer.Option(Path("results"), help="Results folder (run records and leaderboards)."),
    reports: Path = typer.Option(Path("reports"), help="Reports folder (plots and README.md)."),
    device: str = DEVICE_OPTION,
    **flags: Any,
) -> None:
    """Train every algorithm x dataset x alpha x seed not yet done, then rebuild leaderboards and plots."""
    from pflbench import api

    if dry_run:
        from pflbench.experiments.sweep import pending_summary

        status = api.sweep_status(algos, datasets=datasets or None, alphas=alpha or None, seeds=seeds or None,
                                  preset=preset, config=config, hp=hp or [], results=results,
                                  plugins=plugin or (), retry_failed=retry_failed, tuned=tuned,
                                  on_warning=warn_one, **given(flags))
        typer.echo("\n".join(pending_summary(status, results)))
        return
    with SweepProgress() as progress:
        done = api.sweep_outcome(algos, datasets=datasets or None, alphas=alpha or None, seeds=seeds or None,
                                 preset=preset, config=config, hp=hp or [], results=results, reports=reports,
                                 data_root=data_root_, workers=workers, executor=executor, ray_address=ray_address,
                                 device=device, plugins=plugin or (), retry_failed=retry_failed, tuned=tuned,
                                 gpus_per_run=gpus_per_run, threads=threads,
                                 on_start=progress.start, on_record=progress.record, on_warning=warn_one,
                                 **given(flags))
    outcome, page = done.outcome, done.report
    typer.echo(f"{len(outcome.ran)} run(s) trained, {len(outcome.skipped)} already done; "
               f"leaderboards in {results}, report at {page}")
    failed, missing = outcome.failed(results), outcome.missing(results)
    for c in failed:
        typer.echo(f"failed: {c.run_id()} ({c.algo}, {c.dataset}, alpha={c.alpha:g}, seed={c.seed})", err=True)
    for c in missing:
        typer.echo(f"missing: {c.run_id()}", err=True)
    if failed or missing:
        raise typer.Exit(1)


app.command()(user_errors(with_run_flags(sweep, unset_defaults=True)))


def tune(
    budget: int = typer.Option(..., help="Finished trials per study, the same for every algorithm."),
    tune_seeds: Optional[List[int]] = typer.Option(None, help="Seeds the trials run on (the objective is "
                                                   "their mean); final sweeps must use others [default: 1000]."),
    algos: Optional[str] = ALGOS_OPTION,
    alpha: Optional[List[float]] = ALPHAS_OPTION,
    datasets: Optional[List[str]] = DATASETS_OPTION,
    preset: Optional[str] = typer.Option(None, help="quick (default) or fedobp: the settings to tune under."),
    config: Optional[Path] = typer.Option(None, help="TOML file with the sweep's settings and [search] overrides."),
    hp: Optional[List[str]] = typer.Option(None, help="KEY=VALUE fixed for every trial (then not searched)."),
    plugin: Optional[List[str]] = PLUGINS_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    executor: str = EXECUTOR_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    gpus_per_run: Optional[float] = GPUS_PER_RUN_OPTION,
    data_root_: Optional[Path] = DATA_ROOT_OPTION,
    results: Path = typer.Option(Path("results"), help="Results folder; studies go to DIR/tuning/."),
    device: str = DEVICE_OPTION,
    **flags: Any,
) -> None:
    """Tune every algorithm with the same budget on validation data (Optuna TPE; resumable).
    The trials hold out --val-ratio (default 0.1) of each client's training samples."""
    from pflbench import api
    from pflbench.experiments.tuning import DEFAULT_TUNE_SEEDS, DEFAULT_VAL_RATIO

    val_ratio = flags.pop("val_ratio", None)

    def report_trial(pending: Any, value: Optional[float]) -> None:
        shown = ", ".join(f"{k}={show_value(v)}" for k, v in pending.values.items())
        outcome = f"val {value:.2f}%" if value is not None else "FAILED"
        typer.echo(f"{pending.spec.name} trial {pending.trial.number}: {outcome} ({shown})")

    chosen = api.tune(budget, algos, tune_seeds=tune_seeds or DEFAULT_TUNE_SEEDS,
                      val_ratio=DEFAULT_VAL_RATIO if val_ratio is None else val_ratio, datasets=datasets or None,
                      alphas=alpha or None, preset=preset, config=config, hp=hp or [], results=results,
                      data_root=data_root_, workers=workers, executor=executor, ray_address=ray_address,
                      device=device, plugins=plugin or (), gpus_per_run=gpus_per_run, threads=threads,
                      on_trial=report_trial,
                      on_warning=warn_one,
                      **given(flags))
    typer.echo(f"{len(chosen)} stud(ies) at budget {budget}; choices in {results / 'tuning' / 'chosen.csv'}")


app.command()(user_errors(with_run_flags(tune, unset_defaults=True)))


@app.command()
@user_errors
def report(
    results: Path = typer.Option(Path("results"), help="Results folder with runs/."),
    reports: Path = typer.Option(Path("reports"), help="Where plots and README.md go."),
) -> None:
    """Rebuild every leaderboard CSV and plot from stored runs, without training."""
    from pflbench import api

    typer.echo(f"report written to {api.report(results, reports)}")


@app.command()
@user_errors
def compare(
    a: str = typer.Argument(..., help="An algorithm (or algo[hp] where it ran with several settings); "
                            "append :ft for its accuracy after --finetune-epochs."),
    b: str = typer.Argument(..., help="The algorithm to compare it with."),
    results: Path = typer.Option(Path("results"), help="Results folder with runs/."),
    dataset: Optional[str] = typer.Option(None, help="Only this dataset."),
    alpha: Optional[List[float]] = typer.Option(None, help="Only these alphas, e.g. --alpha 0.1 0.5."),
    format_: str = typer.Option("markdown", "--format", help="markdown or csv."),
) -> None:
    """A minus B, paired by seed and client, in every cell where both ran: difference, 95%
    interval, p-value, seeds won and the share of clients on which A beats B."""
    from pflbench import api
    from pflbench.analysis.report import markdown_table

    if format_ not in ("markdown", "csv"):
        raise UserError(f"--format {format_}: use markdown or csv")
    table = api.compare(a, b, results, dataset, alpha or None)
    if format_ == "csv":
        typer.echo(table.to_csv(index=False, float_format="%.4f"), nl=False)
    else:
        shown = table.assign(**{c: table[c].map(lambda p: f"{p:.4f}") for c in ("p_value", "p_holm")})
        typer.echo(markdown_table(shown))


@app.command("list")
@user_errors
def list_(
    plugin: Optional[List[str]] = typer.Option(None, help="Python file or folder with extra algorithms."),
    data_root_: Optional[Path] = DATA_ROOT_OPTION,
) -> None:
    """Show datasets, models and algorithms with their hyperparameters and search spaces."""
    warn(load_algorithms(plugin or ()))
    typer.echo("datasets: " + ", ".join(available_datasets(data_root(data_root_))))
    typer.echo("models: auto, " + ", ".join(sorted(MODELS)))
    typer.echo("algorithms:")
    for name in sorted(ALGORITHMS):
        cls = ALGORITHMS[name]
        typer.echo(f"  {name:<12} {cls.description} [{cls.citation}]")
        typer.echo(f"  {'':<12}   test-time adaptation: {cls.describe_eval_adaptation(cls.Hyperparams())}")
        typer.echo(f"  {'':<12}   kept per client: {cls.describe_client_state(cls.Hyperparams())}")
        typer.echo(f"  {'':<12}   a newcomer gets: {cls.newcomer}")
        spaces = search_space(cls.Hyperparams)
        for key, value in hyperparam_defaults(cls).items():
            searched = f"   tune: {spaces[key].describe()}" if key in spaces else ""
            typer.echo(f"  {'':<12}   --hp {key}={value}{searched}")
    typer.echo(f"every algorithm's tuning (`pflbench tune`) also searches the run's --lr: {LR_SPACE_NOTE}")


MULTI_VALUE_FLAGS = {"sweep": ("--alpha", "--datasets", "--seeds"), "compare": ("--alpha",),
                     "tune": ("--alpha", "--datasets", "--tune-seeds")}


def expand_multi_value_flags(argv: list[str]) -> list[str]:
    """`--alpha 0.1 0.5` -> `--alpha 0.1 --alpha 0.5` for the list flags of the subcommand
    (click options take one value each)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    flags = MULTI_VALUE_FLAGS.get(command, ())
    out: list[str] = []
    current, consumed = None, False
    for arg in argv:
        if arg in flags:
            if current and not consumed:
                out.append(current)
            current, consumed = arg, False
            continue
        if current and not arg.startswith("--"):
            out += [current, arg]
            consumed = True
            continue
        if current and not consumed:
            out.append(current)
        current = None
        out.append(arg)
    if current and not consumed:
        out.append(current)  # a list flag without values: let click report it
    return out


def main(argv: list[str] | None = None) -> None:
    app(args=expand_multi_value_flags(sys.argv[1:] if argv is None else argv), prog_name="pflbench")


if __name__ == "__main__":
    main()

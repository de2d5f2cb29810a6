"""Sweeps: plan resolution, resumability, failures, leaderboards, report, kill-and-restart, Ray."""

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pflbench.cli import app, expand_multi_value_flags
from pflbench.errors import UserError
from pflbench.analysis.leaderboard import load_runs, long_leaderboard
from pflbench.core.registry import load_algorithms
from pflbench.experiments.sweep import SweepPlan, build_plan, run_sweep
from pflbench.experiments.records import STAGING_PREFIX

TINY = {"clients": 4, "rounds": 2, "local_epochs": 1, "eval_every": 1, "model": "mlp"}
NO_DATA = Path("/nonexistent-data-root")


def tiny_plan(algos=("fedavg", "local"), alphas=(0.1, 0.5), seeds=(0,), **settings):
    load_algorithms()
    return SweepPlan(algos=list(algos), datasets=["digits"], alphas=list(alphas), seeds=list(seeds),
                     settings={**TINY, **settings})


def temp_leftovers(*folders):
    return [p for folder in folders if folder.exists() for p in folder.rglob("*")
            if ".tmp" in p.name or p.name.startswith(".staging-")]


def comparable(board: pd.DataFrame) -> pd.DataFrame:
    return board.drop(columns=["wall_s"]).reset_index(drop=True)


def test_multi_value_flags_expand_only_for_sweep():
    assert expand_multi_value_flags(["sweep", "--alpha", "0.1", "0.5", "--seeds", "0", "1", "--rounds", "3"]) == \
        ["sweep", "--alpha", "0.1", "--alpha", "0.5", "--seeds", "0", "--seeds", "1", "--rounds", "3"]
    assert expand_multi_value_flags(["run", "--alpha", "0.1"]) == ["run", "--alpha", "0.1"]
    assert expand_multi_value_flags(["sweep", "--algos", "all", "--alpha", "0.1", "0.5"]) == \
        ["sweep", "--algos", "all", "--alpha", "0.1", "--alpha", "0.5"]
    assert expand_multi_value_flags(["sweep", "--alpha", "--seeds", "1"]) == ["sweep", "--alpha", "--seeds", "1"]


def test_plan_merges_preset_then_file_then_flags(tmp_path):
    load_algorithms()
    toml = tmp_path / "grid.toml"
    toml.write_text('algos = ["fedavg", "fedobp"]\nalphas = [0.3]\nrounds = 7\nclients = 12\n'
                    '[hp.fedobp]\nq = 0.99\n')
    plan = build_plan(None, toml, {"rounds": 4}, ["fedobp.ema=0.5"])
    assert plan.algos == ["fedavg", "fedobp"] and plan.alphas == [0.3] and plan.datasets == ["digits"]
    assert plan.settings["rounds"] == 4 and plan.settings["clients"] == 12 and plan.settings["lr"] == 0.05
    configs = plan.configs()
    assert len(configs) == 2 * 3  # two algorithms, the quick preset's three seeds
    fedobp = next(c for c in configs if c.algo == "fedobp")
    assert fedobp.hp["q"] == 0.99 and fedobp.hp["ema"] == 0.5
    assert build_plan("fedobp", None, {}, []).settings["rounds"] == 400


@pytest.mark.parametrize("hp, message", [
    (["nope=1"], "no algorithm in the sweep has a hyperparameter 'nope'"),
    (["fedper.q=1"], "fedper has no hyperparameter 'q'"),
    (["fedobp.q=2"], "q must be in [0, 1]"),
    (["ditto.q=1"], "'ditto' is not among"),
])
def test_bad_sweep_hyperparameters_are_user_errors(hp, message):
    load_algorithms()
    with pytest.raises(UserError, match=None) as err:
        build_plan(None, None, {"algos": "fedper,fedobp"}, hp).configs()
    assert message in str(err.value)


def test_a_files_hyperparameters_for_algorithms_algos_leaves_out_stay_with_the_file(tmp_path):
    load_algorithms()
    toml = tmp_path / "grid.toml"
    toml.write_text('algos = "fedavg,scaffold,ditto"\n[hp]\nlam = 0.5\n[hp.scaffold]\ncv_lr = "effective"\n')
    assert build_plan(None, toml, {}, []).hp == {"lam": "0.5", "scaffold.cv_lr": "effective"}
    assert build_plan(None, toml, {"algos": "fedavg,ditto"}, []).hp == {"lam": "0.5"}
    assert build_plan(None, toml, {"algos": "fedavg"}, []).hp == {}
    with pytest.raises(UserError, match="'scaffold' is not among"):  # a flag the sweep cannot use is a mistake
        build_plan(None, toml, {"algos": "fedavg"}, ["scaffold.cv_lr=lr"])
    toml.write_text('algos = "fedavg"\n[hp.scaffold]\ncv_lr = "effective"\n')
    with pytest.raises(UserError, match="'scaffold' is not among"):  # so is a file's own
        build_plan(None, toml, {}, [])


def test_bad_config_file_is_a_user_error(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text("rounds = 3\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match="unknown key"):
        build_plan(None, toml, {}, [])
    toml.write_text("rounds = [\n")
    with pytest.raises(UserError, match="not valid TOML"):
        build_plan(None, toml, {}, [])


def test_sweep_skips_finished_runs(tmp_path):
    plan = tiny_plan()
    first = run_sweep(plan, tmp_path, NO_DATA)
    assert len(first.ran) == 4 and not first.skipped
    second = run_sweep(plan, tmp_path, NO_DATA)
    assert not second.ran and len(second.skipped) == 4


def test_diverging_run_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    plan = SweepPlan(algos=["fedavg"], datasets=["digits"], alphas=[0.5], seeds=[0], settings=TINY)
    bad = SweepPlan(algos=["fedavg"], datasets=["digits"], alphas=[0.5], seeds=[0], settings={**TINY, "lr": 1e12})
    load_algorithms()
    run_sweep(bad, tmp_path, NO_DATA)
    outcome = run_sweep(plan, tmp_path, NO_DATA)
    assert len(outcome.ran) == 1
    runs = load_runs(tmp_path)
    failed = runs[runs["status"] == "failed"]
    assert len(failed) == 1 and "FloatingPointError" in failed.iloc[0]["error"]
    assert bad.configs()[0] in run_sweep(bad, tmp_path, NO_DATA).failed(tmp_path)
    assert len(run_sweep(bad, tmp_path, NO_DATA, retry_failed=True).ran) == 1


def test_leaderboard_averages_seeds(tmp_path):
    run_sweep(tiny_plan(algos=["fedavg"], alphas=[0.5], seeds=(0, 1)), tmp_path, NO_DATA)
    runs = load_runs(tmp_path)
    board = long_leaderboard(runs)
    assert len(board) == 1
    row = board.iloc[0]
    assert row["seeds"] == 2
    assert row["acc"] == pytest.approx(runs["acc"].mean())
    assert row["acc_std"] == pytest.approx(runs["acc"].std(ddof=1))
    assert row["comm_mb"] == pytest.approx(((runs["comm_up_bytes"] + runs["comm_down_bytes"]) / 1e6).mean())
    assert row["acc_ci_low"] < row["acc"] < row["acc_ci_high"]


def test_compare_pairs_fedavg_fine_tuned_with_its_own_global_model(tmp_path):
    run_sweep(tiny_plan(algos=["fedavg"], alphas=[0.5], seeds=(0,), clients=8, finetune_epochs=1), tmp_path, NO_DATA)
    row = long_leaderboard(load_runs(tmp_path)).iloc[0]
    assert row["protocol"].endswith("-ft1")  # its own protocol, named as fine-tuned
    result = CliRunner().invoke(app, ["compare", "fedavg:ft", "fedavg", "--results", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output))
    assert table["diff"].iloc[0] == pytest.approx(row["acc_ft"] - row["acc"], abs=1e-4)  # csv: 4 decimals
    assert table["acc_fedavg:ft"].iloc[0] == pytest.approx(row["acc_ft"], abs=1e-4)


def test_a_one_seed_cell_has_an_empty_std_and_an_interval_from_its_clients(tmp_path):
    run_sweep(tiny_plan(algos=["fedavg", "local"], alphas=[0.5], seeds=(0,), clients=8), tmp_path, NO_DATA)
    board = long_leaderboard(load_runs(tmp_path)).set_index("algo")
    compare = CliRunner().invoke(app, ["compare", "local", "fedavg", "--results", str(tmp_path), "--format", "csv"])
    assert compare.exit_code == 0, compare.output
    table = pd.read_csv(io.StringIO(compare.output))
    assert table["diff"].iloc[0] == pytest.approx(board.loc["local", "acc"] - board.loc["fedavg", "acc"])
    assert table["seed_wins"].iloc[0] in ("0/1", "1/1")
    for args, message in [(["local", "nope"], "no runs of 'nope'"), (["local", "local"], "two different"),
                          (["local", "fedavg", "--alpha", "0.3"], "match --dataset/--alpha")]:
        bad = CliRunner().invoke(app, ["compare", *args, "--results", str(tmp_path)])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output
    assert board["acc_std"].isna().all()
    for algo in ("fedavg", "local"):
        assert board.loc[algo, "acc_ci_low"] < board.loc[algo, "acc"] < board.loc[algo, "acc_ci_high"]
    assert board["tied_best"].any() and set(board["rank"]) <= {1, 2}
    assert board.loc["fedavg", "diff_vs_fedavg"] == 0.0 and board.loc["fedavg", "p_vs_fedavg"] == 1.0


def test_report_rebuilds_csvs_and_plots_from_stored_runs(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    run_sweep(tiny_plan(algos=("fedavg", "local", "fedper")), results, NO_DATA)
    result = CliRunner().invoke(app, ["report", "--results", str(results), "--reports", str(reports)])
    assert result.exit_code == 0, result.output
    long = (results / "leaderboard.csv").read_text()
    wide = pd.read_csv(results / "leaderboard_digits.csv")
    assert len(wide) == 3 and list(wide["rank"]) == sorted(wide["rank"]) and list(wide["mean_rank"]) == sorted(wide["mean_rank"])
    assert {"alpha=0.1", "alpha=0.5", "alpha=0.1 rank", "mean_rank"} <= set(wide.columns)
    assert len(pd.read_csv(results / "ranking.csv")) == 3
    pngs = sorted(p.name.split("_")[0] for p in reports.glob("*.png"))
    assert pngs == ["acc", "cd", "cd", "clients", "clients", "convergence", "convergence", "intervals", "intervals",
                    "partition", "partition", "wtl"]
    page = (reports / "README.md").read_text()
    assert all(f"]({p.name})" in page for p in reports.glob("*.png"))
    assert re.search(r"Compute: 6 runs, [0-9.]+ hours of wall-clock time \((cpu|cuda) [0-9.]+ h over 6\)", page)
    images = {p.name: p.read_bytes() for p in reports.glob("*.png")}
    (results / "leaderboard.csv").unlink()
    stale, own = reports / "intervals_digits_renamed-protocol_a0.1.png", reports / "my_sketch.png"
    stale.write_bytes(b"an earlier report's figure")
    own.write_bytes(b"not the report's")
    CliRunner().invoke(app, ["report", "--results", str(results), "--reports", str(reports)])
    assert (results / "leaderboard.csv").read_text() == long
    assert not stale.exists() and own.read_bytes() == b"not the report's"  # only the report's own figures go
    own.unlink()
    # unchanged runs redraw byte-identical images (no churn in a committed reports/ folder)
    assert {p.name: p.read_bytes() for p in reports.glob("*.png")} == images


def test_critical_difference_names_hash_the_same_in_every_process():
    """The diagram's bars come from sets of names; a name's hash fixed across processes (not
    str's, salted per process) keeps their drawing order, and the image, the same."""
    from pflbench.analysis.report import StableName

    assert hash(StableName("fedavg")) == 551283534140734481  # the same in any process, on any machine
    assert StableName("fedavg") == "fedavg" and {StableName("a"): 1}[StableName("a")] == 1


def sweep_command(results, reports, *extra):
    return [sys.executable, "-m", "pflbench.cli", "sweep", "--algos", "fedavg,local,fedper,fedobp",
            "--alpha", "0.1", "0.5", "--seeds", "0", "1", "--clients", "4", "--rounds", "3", "--local-epochs", "1",
            "--workers", "1", "--results", str(results), "--reports", str(reports), *extra]


def finished_records(runs: Path) -> set[str]:
    """Run folders holding a record: a staging folder (a writer caught mid-record, `.staging-*`)
    may already hold its summary.json, and is not one."""
    return {p.parent.name for p in runs.glob("*/summary.json") if not p.parent.name.startswith(STAGING_PREFIX)}


def test_killed_sweep_restarts_to_exactly_the_uninterrupted_result(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert subprocess.run(sweep_command(full / "results", full / "reports"), env=env,
                          capture_output=True).returncode == 0
    proc = subprocess.Popen(sweep_command(cut / "results", cut / "reports"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=os.setpgrp)  # own process group, same session (a new session runs ~3x slower on some hosts)
    deadline = time.time() + 120
    while len(finished_records(cut / "results" / "runs")) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = finished_records(cut / "results" / "runs")
    assert 3 <= len(partial) < 16
    restart = subprocess.run(sweep_command(cut / "results", cut / "reports"), env=env, capture_output=True, text=True)
    assert restart.returncode == 0, restart.stderr
    assert f"{16 - len(partial)} run(s) to train, {len(partial)} already recorded" in restart.stdout
    names = {p.name for p in (full / "results" / "runs").iterdir()}
    assert {p.name for p in (cut / "results" / "runs").iterdir()} == names
    for name in names:
        for csv in ("rounds.csv", "clients.csv"):
            a = pd.read_csv(full / "results" / "runs" / name / csv).drop(columns="elapsed_s", errors="ignore")
            b = pd.read_csv(cut / "results" / "runs" / name / csv).drop(columns="elapsed_s", errors="ignore")
            pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(comparable(pd.read_csv(full / "results" / "leaderboard.csv")),
                                  comparable(pd.read_csv(cut / "results" / "leaderboard.csv")))
    assert not temp_leftovers(cut, full)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")
def test_ray_and_local_executors_give_the_same_leaderboard(tmp_path):
    plan = tiny_plan(algos=("fedavg", "fedper"), alphas=(0.1, 0.5))
    local, ray_results = tmp_path / "local", tmp_path / "ray"
    run_sweep(plan, local, NO_DATA, executor="local", workers=2)
    outcome = run_sweep(plan, ray_results, NO_DATA, executor="ray", workers=2)
    assert len(outcome.ran) == 4 and all(r.ok for r in outcome.ran)
    pd.testing.assert_frame_equal(comparable(long_leaderboard(load_runs(local))),
                                  comparable(long_leaderboard(load_runs(ray_results))))


def test_the_quick_preset_runs_three_seeds():
    assert build_plan(None, None, {}, []).seeds == [0, 1, 2]


def test_sweep_cli_default_grid_runs_offline(tmp_path):
    result = CliRunner().invoke(app, expand_multi_value_flags(
        ["sweep", "--algos", "all", "--alpha", "0.1", "0.5", "--rounds", "2", "--seeds", "0", "--clients", "4",
         "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")]))
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    load_algorithms()
    from pflbench.core.registry import ALGORITHMS

    assert len(board) == 2 * len(ALGORITHMS)
    assert (tmp_path / "reports" / "README.md").exists()


def test_threads_reach_torch_in_each_run(monkeypatch):
    """`--threads N` is what torch runs with inside every run; without it a run gets the CPUs
    shared out among the workers (so one worker alone takes every core)."""
    import torch

    import pflbench.experiments.runner as runner
    from pflbench.experiments.executors import Cell, LocalExecutor

    monkeypatch.setattr(runner, "compute_run", lambda *args, **kwargs: torch.get_num_threads())
    cell = Cell(config=None, data_root="", device="cpu", plugins=(), cache_dir="")
    before = torch.get_num_threads()
    try:
        assert list(LocalExecutor(1, threads=3).run([cell])) == [3]
        assert list(LocalExecutor(1).run([cell])) == [max(1, os.cpu_count() or 1)]
    finally:
        torch.set_num_threads(before)


def test_each_record_states_the_thread_count_its_run_trained_with(tmp_path):
    """CPU kernels reduce in an order that depends on torch's thread count, so a record names the
    count its own worker process ran (`--threads`), not the sweep's."""
    outcome = run_sweep(tiny_plan(algos=("fedavg",), alphas=(0.5,)), tmp_path, NO_DATA, workers=2, threads=1)
    (record,) = outcome.ran
    assert record.ok and record.threads == 1
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["threads"] == 1


def test_a_dry_run_lists_exactly_the_cells_a_sweep_would_train_and_writes_nothing(tmp_path):
    from pflbench.api import sweep_outcome, sweep_status
    from pflbench.experiments.sweep import pending_summary

    grid = dict(algos="fedavg,local", datasets=["digits"], alphas=[0.1, 0.5], seeds=[0], **TINY)
    results = tmp_path / "results"
    status = sweep_status(results=results, **grid)
    assert len(status.planned) == 4 and not status.skipped and status.to_train() == status.planned
    assert not results.exists()
    assert pending_summary(status, results) == [
        "4 run(s) planned: 0 recorded, 4 to train",
        "  digits dirichlet alpha=0.1 seed=0: all 2 to train",
        "  digits dirichlet alpha=0.5 seed=0: all 2 to train"]
    sweep_outcome(results=results, reports=None, data_root=NO_DATA, **{**grid, "algos": "local", "alphas": [0.5]})
    status = sweep_status(results=results, **grid)
    assert [(c.algo, c.alpha) for c in status.to_train()] == [("fedavg", 0.1), ("local", 0.1), ("fedavg", 0.5)]
    assert pending_summary(status, results) == [
        "4 run(s) planned: 1 recorded, 3 to train",
        "  digits dirichlet alpha=0.1 seed=0: all 2 to train",
        "  digits dirichlet alpha=0.5 seed=0: 1 to train: fedavg"]
    diverging = {**grid, "algos": "fedavg", "lr": 1e12}  # failed records: recorded, unless retried
    sweep_outcome(results=results, reports=None, data_root=NO_DATA, **diverging)
    assert pending_summary(sweep_status(results=results, **diverging), results) == [
        "2 run(s) planned: 2 recorded (2 failed), 0 to train"]
    assert len(sweep_status(results=results, retry_failed=True, **diverging).to_train()) == 2
    trained = sweep_outcome(results=results, reports=None, data_root=NO_DATA, **grid).outcome
    assert [r.config.run_id() for r in trained.ran] == [c.run_id() for c in status.to_train()]


def test_sweep_dry_run_cli_trains_nothing(tmp_path):
    results = tmp_path / "results"
    result = CliRunner().invoke(app, expand_multi_value_flags(
        ["sweep", "--dry-run", "--algos", "fedavg,fedper", "--alpha", "0.1", "--seeds", "0", "1",
         "--rounds", "2", "--results", str(results), "--reports", str(tmp_path / "reports")]))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "4 run(s) planned: 0 recorded, 4 to train"
    assert not results.exists() and not (tmp_path / "reports").exists()
    bad = CliRunner().invoke(app, ["sweep", "--dry-run", "--algos", "nope"])
    assert bad.exit_code == 2 and "unknown algorithm 'nope'" in bad.output


def test_each_report_section_states_what_its_runs_cost():
    from pflbench.analysis.report import compute_line

    runs = pd.DataFrame({"wall_s": [600.0, 1200.0, 60.0, float("nan")], "device": ["cpu", "cpu", "cuda", "cpu"]})
    assert compute_line(runs) == ("Compute: 3 runs, 0.5 hours of wall-clock time (cpu 0.5 h over 2, cuda 0.0 h "
                                  "over 1); one run took 1.0 to 20.0 minutes (median 10.0).")
    assert compute_line(runs.iloc[3:]) == "Compute: not recorded."

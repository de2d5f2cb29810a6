"""Tuning: search spaces, the validation-only objective, equal budgets with failed trials, resume
after SIGKILL, and the tuned cells of a sweep."""

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pflbench.cli import app
from pflbench.core.data import Dataset
from pflbench.core.registry import load_algorithms
from pflbench.core.search import Choice, Fixed, Integer, NearOne, Real, override
from pflbench.errors import UserError
from pflbench.experiments.records import STAGING_PREFIX
from pflbench.experiments import runner
from pflbench.experiments.sweep import SweepPlan, build_plan
from pflbench.experiments import tuning
from pflbench.experiments.config import LATER_SETTINGS
from pflbench.experiments.studies import load_study, open_storage
from pflbench.experiments.tuning import next_trial, run_tuning, study_specs, study_spaces, tuned_configs

NO_DATA = Path("/nonexistent-data-root")
TINY = {"clients": 4, "rounds": 2, "local_epochs": 1, "eval_every": 1, "batch_size": 32, "lr": 0.05, "model": "mlp"}

FLAKY = '''
from dataclasses import dataclass
from pflbench import Algorithm, register_algorithm
from pflbench.core.search import Real, tunable

@register_algorithm("flaky")
class Flaky(Algorithm):
    """FedAvg whose runs fail when `knob` > 0.5: a stand-in for a diverging trial."""
    description = "FedAvg that fails above knob 0.5 (tests failed trials)."
    citation = "none"

    @dataclass
    class Hyperparams:
        knob: float = tunable(0.1, Real(0.0, 1.0))

    def local_train(self, cid, model, round_):
        if self.hp.knob > 0.5:
            raise FloatingPointError("knob too high")
        return super().local_train(cid, model, round_)
'''


def plan(algos=("fedavg", "fedprox"), alphas=(0.5,), seeds=(0,), search=None, hp=None, **settings):
    load_algorithms()
    return SweepPlan(algos=list(algos), datasets=["digits"], alphas=list(alphas), seeds=list(seeds),
                     settings={**TINY, **settings}, hp=hp or {}, search=search or {})


def trials_table(results: Path) -> pd.DataFrame:
    return pd.read_csv(results / "tuning" / "trials.csv").sort_values(["study", "trial"]).reset_index(drop=True)


class FakeTrial:
    """Records what a space asks of a trial and answers with the range's midpoint (or first choice)."""

    def __init__(self):
        self.asked = {}

    def suggest_float(self, name, low, high, log=False):
        self.asked[name] = ("float", low, high, log)
        return (low * high) ** 0.5 if log else (low + high) / 2

    def suggest_int(self, name, low, high, log=False):
        self.asked[name] = ("int", low, high, log)
        return (low + high) // 2

    def suggest_categorical(self, name, choices):
        self.asked[name] = ("cat", tuple(choices))
        return choices[0]


def test_near_one_draws_the_gap_to_one_on_a_log_scale():
    trial = FakeTrial()
    q = NearOne(0.999, 0.99999).suggest(trial, "q")
    assert trial.asked["1-q"] == ("float", pytest.approx(1e-5), pytest.approx(1e-3), True)
    assert q == pytest.approx(1 - 1e-4)
    assert NearOne(0.999, 0.99999).params("q", 0.9999) == {"1-q": pytest.approx(1e-4)}


def test_overrides_narrow_fix_or_choose():
    assert override(Real(1e-3, 1.0, log=True), [0.01, 0.1], "x") == Real(0.01, 0.1, log=True)
    assert override(NearOne(0.999, 0.99999), [0.9995, 0.9999], "x") == NearOne(0.9995, 0.9999)
    assert override(Integer(1, 10), [2, 4], "x") == Integer(2, 4)
    assert override(Real(0.0, 1.0), 0.3, "x") == Fixed(0.3)
    assert override(None, ["a", "b"], "x") == Choice(("a", "b"))
    for bad in ([0.5, 0.1], [1, 2, 3], ["a", "b"]):
        with pytest.raises(UserError, match="x"):
            override(Real(0.0, 1.0), bad, "x")
    with pytest.raises(UserError, match="integers"):
        override(Integer(1, 10), [1.5, 3], "x")


def test_search_table_reaches_the_right_algorithms(tmp_path):
    load_algorithms()
    spaces = study_spaces("fedobp", 0.01, {"lr": [0.005, 0.02], "fedobp": {"q": [0.999, 0.9999], "score": "abs_prod"}})
    assert spaces["lr"] == Real(0.005, 0.02, log=True)
    assert spaces["q"] == NearOne(0.999, 0.9999) and spaces["score"] == Fixed("abs_prod")
    assert study_spaces("fedavg", 0.01, {})["lr"] == Real(0.001, 0.1, log=True)
    with pytest.raises(UserError, match=r"\[search.fedobp\] nope"):
        study_spaces("fedobp", 0.01, {"fedobp": {"nope": [1, 2]}})
    toml = tmp_path / "grid.toml"
    toml.write_text('algos = "fedobp,fedavg"\n[search.fedobp]\nq = [0.999, 0.99999]\n[search.ditto]\nlam = [0.1, 1]\n')
    with pytest.raises(UserError, match="ditto"):
        study_specs(build_plan(None, toml, {}, []), (1000,), 0.1)


def test_a_fixed_hp_is_not_searched():
    (spec,) = study_specs(plan(algos=("fedprox",), hp={"mu": "0.5"}), (1000,), 0.1)
    assert "mu" not in spec.spaces and spec.base_hp == {"mu": 0.5}
    assert all(c.hp["mu"] == 0.5 and c.val_ratio == 0.1 for c in spec.configs({"lr": 0.02}))


def test_tuning_never_reads_test_labels(tmp_path, monkeypatch):
    """Permuting every client's test labels changes test accuracy but no objective and no choice."""
    common = dict(budget=4, tune_seeds=(7,), val_ratio=0.2, data_root=NO_DATA, workers=1)
    run_tuning(plan(), results=tmp_path / "plain", **common)

    real_engine = runner.Engine

    def engine_with_permuted_test_labels(config, data, splits, *args):
        test = np.concatenate([s.test for s in splits])
        y = data.y.clone()
        y[test] = y[test[np.random.default_rng(0).permutation(len(test))]]
        return real_engine(config, Dataset(data.name, data.x, y, data.num_classes), splits, *args)

    monkeypatch.setattr(runner, "Engine", engine_with_permuted_test_labels)
    run_tuning(plan(), results=tmp_path / "permuted", **common)

    plain, permuted = trials_table(tmp_path / "plain"), trials_table(tmp_path / "permuted")
    assert len(plain) == 8
    pd.testing.assert_frame_equal(plain, permuted)
    a = pd.read_csv(tmp_path / "plain" / "tuning" / "chosen.csv")
    b = pd.read_csv(tmp_path / "permuted" / "tuning" / "chosen.csv")
    pd.testing.assert_frame_equal(a, b)
    accs = [pd.read_csv(p / "rounds.csv")["acc"].tolist()
            for p in sorted((tmp_path / "plain" / "tuning" / "runs").iterdir())]
    accs_permuted = [pd.read_csv(p / "rounds.csv")["acc"].tolist()
                     for p in sorted((tmp_path / "permuted" / "tuning" / "runs").iterdir())]
    assert accs != accs_permuted  # the permutation did reach the test sets


def test_every_study_gets_exactly_the_budget_and_failures_count(tmp_path):
    flaky = tmp_path / "flaky.py"
    flaky.write_text(FLAKY)
    load_algorithms([flaky])
    chosen = run_tuning(plan(algos=("flaky", "fedavg")), budget=6, tune_seeds=(7,), val_ratio=0.2,
                        results=tmp_path / "r", data_root=NO_DATA, workers=1, plugins=(str(flaky),))
    trials = trials_table(tmp_path / "r")
    assert trials.groupby("study").size().tolist() == [6, 6]
    assert set(chosen["finished"]) == {6}
    flaky_trials = trials[trials["algo"] == "flaky"]
    failed = flaky_trials[flaky_trials["state"] == "FAIL"]
    assert len(failed) >= 1 and (failed["error"].str.contains("knob too high")).all()
    knobs = flaky_trials["values"].map(lambda v: json.loads(v)["knob"])
    assert ((knobs > 0.5) == (flaky_trials["state"] == "FAIL")).all()
    assert int(chosen.loc[chosen["algo"] == "flaky", "failed"].iloc[0]) == len(failed)
    first = trials.groupby("study").first()
    assert first["default"].all() and (first["trial"] == 0).all()
    assert json.loads(first.loc[first["algo"] == "flaky", "values"].iloc[0]) == {"lr": 0.05, "knob": 0.1}
    failed_records = [json.loads((p / "summary.json").read_text())["status"]
                      for p in (tmp_path / "r" / "tuning" / "runs").iterdir()]
    assert failed_records.count("failed") == len(failed)
    again = run_tuning(plan(algos=("flaky", "fedavg")), budget=6, tune_seeds=(7,), val_ratio=0.2,
                       results=tmp_path / "r", data_root=NO_DATA, workers=1, plugins=(str(flaky),))
    pd.testing.assert_frame_equal(trials_table(tmp_path / "r"), trials)  # nothing repeated
    pd.testing.assert_frame_equal(again, chosen)


def tune_command(results):
    return [sys.executable, "-m", "pflbench.cli", "tune", "--algos", "fedavg,fedprox", "--alpha", "0.5",
            "--budget", "5", "--tune-seeds", "3", "--clients", "4", "--rounds", "4", "--local-epochs", "1",
            "--workers", "1", "--results", str(results)]


def running_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=1)) as con:  # closed: no lock outlives the poll
            return con.execute("select count(*) from trials where state = 'RUNNING' and number >= 1").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_tuning_resumes_to_the_same_choices(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert subprocess.run(tune_command(full), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(tune_command(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=os.setpgrp)  # own process group, same session (a new session runs ~3x slower on some hosts)
    # wait for two finished trials (their records), then for the next one to be marked running,
    # and kill during it; waiting for the records first keeps the database polls (which race with
    # the writer's locks) to the few moments before the kill, and a fixed pause instead missed the
    # third trial's start on a loaded machine
    deadline = time.time() + 120
    while sum(not p.parent.name.startswith(STAGING_PREFIX)
              for p in (cut / "tuning" / "runs").glob("*/summary.json")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    while running_trials(cut / "tuning" / "studies.db") < 1 and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert running_trials(cut / "tuning" / "studies.db") >= 1  # killed mid-trial
    restart = subprocess.run(tune_command(cut), env=env, capture_output=True, text=True)
    assert restart.returncode == 0, restart.stderr
    pd.testing.assert_frame_equal(trials_table(full), trials_table(cut))
    chosen_full, chosen_cut = (pd.read_csv(r / "tuning" / "chosen.csv") for r in (full, cut))
    pd.testing.assert_frame_equal(chosen_full, chosen_cut)
    assert not list((cut / "tuning" / "runs").glob(".staging-*"))


def test_a_trial_killed_while_its_values_are_stored_resumes_with_them(tmp_path, monkeypatch):
    """Optuna stores a trial's parameters one by one; a kill between two of them must not change
    what the resumed trial gets (the race behind a rare failure of the SIGKILL test above)."""
    (spec,) = study_specs(plan(algos=("fedprox",)), (1000,), 0.1)
    assert len(spec.spaces) == 2  # lr and mu

    def study_after_defaults(name):
        study = load_study(open_storage(tmp_path / name), spec, budget=5)
        default = next_trial(study, spec, budget=5)
        study.tell(default.trial.number, 50.0)
        return study

    unbroken = next_trial(study_after_defaults("unbroken"), spec, budget=5)
    study = study_after_defaults("killed")
    real_suggest_all = tuning.suggest_all

    def killed_after_one_value(trial, spaces):
        if trial.study._study_id != study._study_id or trial.study._storage is not study._storage:
            return real_suggest_all(trial, spaces)  # a draw that stores nothing
        name, space = next(iter(spaces.items()))
        space.suggest(trial, name)
        raise KeyboardInterrupt  # the kill, with one of the trial's two values stored

    monkeypatch.setattr(tuning, "suggest_all", killed_after_one_value)
    with pytest.raises(KeyboardInterrupt):
        next_trial(study, spec, budget=5)
    monkeypatch.setattr(tuning, "suggest_all", real_suggest_all)
    resumed = next_trial(study, spec, budget=5)
    assert resumed.trial.number == unbroken.trial.number == 1
    assert resumed.values == unbroken.values
    assert len(study.get_trials(deepcopy=False)) == 2  # resumed, not asked anew


def test_study_names_ignore_settings_added_later_at_their_defaults():
    """A setting added after studies were committed must not rename them (as with run ids), or a
    `tune` would start over beside them; a non-default value is a different study."""
    (spec,) = study_specs(plan(algos=("fedavg",)), (1000,), 0.1)
    older = {k: v for k, v in spec.settings.items() if k == "val_ratio" or k not in LATER_SETTINGS}
    assert spec.name == dataclasses.replace(spec, settings=older).name
    assert spec.name != dataclasses.replace(spec, settings={**spec.settings, "sigma": 2.0}).name
    assert spec.name != dataclasses.replace(spec, settings={**spec.settings, "val_ratio": 0.2}).name


def test_the_committed_studies_keep_their_names():
    """`results/tuning` holds studies committed with earlier code: the current code must name them
    the same, or `pflbench tune` would start over beside them. A change to an algorithm's search
    space or defaults renames its study, and fails here, which says the committed choice is stale."""
    chosen = pd.read_csv(Path(__file__).resolve().parents[1] / "results" / "tuning" / "chosen.csv")
    quick = chosen[chosen.dataset == "digits"]
    load_algorithms()
    specs = study_specs(build_plan("quick", None, {"algos": ",".join(sorted(set(quick.algo)))}, []), (1000,), 0.1)
    assert sorted(spec.name for spec in specs) == sorted(quick.study)


def test_tuned_sweep_runs_the_choices_on_other_seeds(tmp_path):
    results = tmp_path / "r"
    run_tuning(plan(), budget=3, tune_seeds=(7,), val_ratio=0.2, results=results, data_root=NO_DATA, workers=1)
    chosen = pd.read_csv(results / "tuning" / "chosen.csv").set_index("algo")
    configs = tuned_configs(plan(seeds=(0, 1)), results)
    assert len(configs) == 4
    for c in configs:
        values = json.loads(chosen.loc[c.algo, "chosen"])
        assert c.lr == values["lr"] and c.tuned_budget == 3 and c.val_ratio == 0.0
        assert c.tuned_study == chosen.loc[c.algo, "study"]
        assert all(c.hp[k] == v for k, v in values.items() if k != "lr")
    with pytest.raises(UserError, match="seed\\(s\\) 7 tuned"):
        tuned_configs(plan(seeds=(0, 7)), results)
    with pytest.raises(UserError, match="no tuning study"):
        tuned_configs(plan(seeds=(0,), rounds=3), results)
    with pytest.raises(UserError, match="--hp does not combine"):
        tuned_configs(plan(seeds=(0,), hp={"mu": "0.1"}), results)
    result = CliRunner().invoke(app, ["sweep", "--tuned", "--algos", "fedavg,fedprox", "--alpha", "0.5", "--seeds",
                                      "7", "--clients", "4", "--rounds", "2", "--local-epochs", "1", "--eval-every",
                                      "1", "--batch-size", "32", "--lr", "0.05", "--model", "mlp", "--results",
                                      str(results), "--reports", str(tmp_path / "rep")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "final seeds must differ" in result.output


def test_tuned_and_untuned_rows_never_average(tmp_path):
    from pflbench.analysis.leaderboard import load_runs, long_leaderboard, ranking_table, wide_leaderboard
    from pflbench.experiments.sweep import run_sweep

    results = tmp_path / "r"
    grid = dict(algos=("fedavg", "fedprox", "local"), alphas=(0.1, 0.5))
    run_tuning(plan(**grid), budget=2, tune_seeds=(7,), val_ratio=0.2, results=results, data_root=NO_DATA,
               workers=1)
    run_sweep(plan(seeds=(0,), **grid), results, NO_DATA)
    run_sweep(plan(seeds=(0,), **grid), results, NO_DATA, tuned=True)
    board = long_leaderboard(load_runs(results))
    assert len(board) == 12 and (board["seeds"] == 1).all()
    tuned = board[board["tuned_budget"] == 2]
    assert len(tuned) == 6 and tuned["protocol"].str.endswith("-tuned2").all()
    assert tuned["protocol"].nunique() == 1 and (tuned["hp"] == "tuned").all()
    assert tuned["chosen"].str.contains("lr=").all()
    assert (board[board["tuned_budget"] == 0]["protocol"] != tuned["protocol"].iloc[0]).all()
    wide = wide_leaderboard(tuned)  # one row per algorithm, though its choice differs per alpha
    assert sorted(wide["algo"]) == ["fedavg", "fedprox", "local"]
    assert wide[["alpha=0.1", "alpha=0.5"]].notna().all().all()
    assert set(ranking_table(board)["protocol"]) == set(board["protocol"])


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be >= 1"),
    (["--budget", "2", "--val-ratio", "0"], "--val-ratio must be in (0, 1)"),
])
def test_tune_user_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["tune", "--algos", "fedavg", "--alpha", "0.5", *args,
                                      "--results", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output


def test_protocol_keys_survive_a_later_setting_at_its_default():
    from pflbench.experiments.config import protocol_key

    settings = {"rounds": 10, "lr": 0.05}
    assert protocol_key(settings) == protocol_key({**settings, "precision": "fp32", "val_ratio": 0.1})
    assert protocol_key(settings) != protocol_key({**settings, "precision": "bf16"})

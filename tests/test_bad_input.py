"""Bad input to `run`, `sweep`, `tune` and `report` is one line on stderr and exit status 2, never a
traceback: mistyped config files, unwritable results folders, diverging runs, --workers < 1;
--eval-every beyond --rounds is one warning line and no error."""

import json

import pytest
from typer.testing import CliRunner

from pflbench.cli import app
from pflbench.errors import UserError
from pflbench.experiments.config import RunConfig
from pflbench.experiments.executors import LocalExecutor, RayExecutor
from pflbench.experiments.sweep import build_plan

SMALL = ["--clients", "4", "--rounds", "2", "--local-epochs", "1", "--model", "mlp", "--device", "cpu"]
TINY = ["--dataset", "digits", *SMALL, "--eval-every", "1"]
TINY_GRID = ["--algos", "fedavg", "--alpha", "0.5", "--datasets", "digits", *SMALL]


def invoke(args):
    return CliRunner().invoke(app, args)


def one_error_line(result, *words):
    """Exit status 2, one `pflbench: error:` line on stderr that contains every word, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("pflbench: error:"), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("line, message", [
    ('rounds = "ten"', "rounds must be an integer (got 'ten')"),
    ("rounds = true", "rounds must be an integer (got True)"),
    ('lr = "fast"', "lr must be a number (got 'fast')"),
    ('model = 5', "model must be a string (got 5)"),
    ('alphas = "0.1"', "alphas must be a list of numbers"),
    ("alphas = []", "alphas must be a list of numbers"),
    ("seeds = [1.5]", "seeds must be a list of integers"),
    ('datasets = "digits"', "datasets must be a list of names"),
    ("algos = 3", 'algos must be "all" or a list of names'),
    ('hp = "q=1"', "hp must be a table"),
    ("search = 1", "search must be a table"),
])
@pytest.mark.parametrize("command", [["sweep"], ["tune", "--budget", "1"]])
def test_config_file_with_a_wrong_type_is_one_line(tmp_path, command, line, message):
    toml = tmp_path / "grid.toml"
    toml.write_text(line + "\n")
    result = invoke([*command, "--config", str(toml), "--results", str(tmp_path / "results")])
    one_error_line(result, message, str(toml))
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("flags, message", [
    ({"alphas": 0.1}, "alphas must be a list of numbers"),
    ({"seeds": ["0"]}, "seeds must be a list of integers"),
    ({"rounds": "ten"}, "rounds must be an integer (got 'ten')"),
    ({"lr": "fast"}, "lr must be a number (got 'fast')"),
])
def test_python_api_flags_of_a_wrong_type_are_user_errors(flags, message):
    with pytest.raises(UserError) as err:
        build_plan(None, None, flags, [])
    assert message in str(err.value) and "config file" not in str(err.value)


def test_run_config_types_accept_what_flags_and_records_give():
    config = RunConfig(alpha=1, lr=1e-2, rounds=3, hp={"q": 0.9})  # an int where a float is due is fine
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match=r"seed must be an integer \(got 1.5\)"):
        RunConfig(seed=1.5)
    with pytest.raises(UserError, match="hp must be a table"):
        RunConfig(hp=[])


def results_args(command, results):
    """A tiny `command` writing to `results` (one run, or one trial)."""
    return {"run": ["run", *TINY, "--results", str(results)],
            "sweep": ["sweep", *TINY_GRID, "--seeds", "0", "--workers", "1", "--results", str(results),
                      "--reports", str(results.parent / "reports")],
            "tune": ["tune", "--budget", "1", *TINY_GRID, "--workers", "1", "--results", str(results)],
            "report": ["report", "--results", str(results)]}[command]


@pytest.mark.parametrize("command", ["run", "sweep", "tune", "report"])
def test_results_that_is_a_file_is_one_line(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    one_error_line(invoke(results_args(command, afile)), f"--results {afile} is a file; pass a folder")


@pytest.mark.parametrize("command", ["run", "sweep", "tune"])
def test_results_that_cannot_be_written_is_one_line(tmp_path, command):
    (tmp_path / "afile").write_text("")  # a folder below a regular file fails for root too
    results = tmp_path / "afile" / "results"
    one_error_line(invoke(results_args(command, results)), f"cannot write to --results {results}",
                   "pass a writable folder")


def test_reports_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "reports").write_text("")
    result = invoke(["sweep", *TINY_GRID, "--seeds", "0", "--results", str(tmp_path / "results"),
                     "--reports", str(tmp_path / "reports")])
    one_error_line(result, "--reports", "is a file; pass a folder")
    assert not (tmp_path / "results" / "runs").exists()


def test_diverging_run_writes_a_failed_record_and_is_one_line(tmp_path):
    results = tmp_path / "results"
    result = invoke(["run", "--algo", "fedavg", *TINY, "--lr", "1e6", "--results", str(results)])
    line = one_error_line(result, "in round 1; lower --lr", "failed record:")
    (record,) = (results / "runs").iterdir()
    assert str(record) in line
    summary = json.loads((record / "summary.json").read_text())
    assert summary["status"] == "failed" and "FloatingPointError" in summary["error"]
    assert not (record / "rounds.csv").exists()


@pytest.mark.parametrize("workers", ["0", "-1"])
@pytest.mark.parametrize("command", [["sweep"], ["tune", "--budget", "1"]])
def test_workers_below_one_is_one_line_before_anything_starts(tmp_path, command, workers):
    result = invoke([*command, *TINY_GRID, "--workers", workers, "--results", str(tmp_path / "results")])
    assert result.stdout == ""
    one_error_line(result, f"--workers must be >= 1 (got {workers})")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", [["sweep"], ["tune", "--budget", "1"]])
def test_threads_below_one_is_one_line_before_anything_starts(tmp_path, command):
    result = invoke([*command, *TINY_GRID, "--threads", "0", "--results", str(tmp_path / "results")])
    assert result.stdout == ""
    one_error_line(result, "--threads must be >= 1 (got 0)")
    assert not (tmp_path / "results").exists()


def test_every_executor_refuses_workers_below_one():
    for make in (lambda: LocalExecutor(0), lambda: RayExecutor(0, None)):
        with pytest.raises(UserError, match="--workers must be >= 1"):
            make()


def warnings_of(result):
    return [line for line in result.stderr.splitlines() if line.startswith("pflbench: warning:")]


@pytest.mark.parametrize("command", ["run", "sweep", "tune"])
def test_eval_every_beyond_rounds_is_one_warning_line(tmp_path, command):
    result = invoke([*results_args(command, tmp_path / "results"), "--eval-every", "3"])  # the last flag wins
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == ["pflbench: warning: --eval-every 3 > --rounds 2: only the last round is evaluated"]
    assert "Traceback" not in result.output


def test_eval_every_within_rounds_warns_nothing(tmp_path):
    result = invoke(["run", *TINY, "--device", "cpu", "--results", str(tmp_path / "results")])
    assert result.exit_code == 0 and not warnings_of(result), result.output


@pytest.mark.parametrize("command, seed", [(["run", "--algo", "fedavg", *TINY, "--seed"], "-5"),
                                           (["run", "--algo", "fedavg", *TINY, "--seed"], str(2**64)),
                                           (["sweep", *TINY_GRID, "--eval-every", "1", "--seeds"], "-1"),
                                           (["tune", "--budget", "1", *TINY_GRID, "--eval-every", "1",
                                             "--tune-seeds"], "-1")])
def test_a_seed_out_of_range_is_one_line_before_anything_starts(tmp_path, command, seed):
    """Negative or huge seeds used to reach numpy's or torch's seeding as a traceback (or, in a
    sweep or a study, a failed record per cell or trial)."""
    result = invoke([*command, seed, "--results", str(tmp_path / "results")])
    one_error_line(result, f"--seed must be an integer in [0, 2**32) (got {seed})")
    assert not (tmp_path / "results").exists()


def test_hp_scoped_to_another_algorithm_is_one_line_and_to_its_own_is_accepted(tmp_path):
    """`ALGO.KEY=VALUE`, as a sweep takes it, names the run's own algorithm or is refused in one line."""
    result = invoke(["run", "--algo", "fedobp", *TINY, "--hp", "fedper.q=0.5", "--results", str(tmp_path / "r")])
    one_error_line(result, "--hp fedper.q: this run trains fedobp, not fedper", "pass q=VALUE or fedobp.q=VALUE")
    result = invoke(["run", "--algo", "fedobp", *TINY, "--hp", "fedobp.q=0.25", "--results", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    config = json.loads(next((tmp_path / "r" / "runs").glob("*/config.json")).read_text())
    assert config["config"]["hp"]["q"] == 0.25

"""The Python API: the README's notebook section runs, and `pflbench.run` writes the very record
`pflbench run` writes."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import pflbench
from pflbench.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {"clients": 4, "rounds": 2, "local_epochs": 1, "eval_every": 1}


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return "\n".join(re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S))


def test_the_readme_notebook_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}  # as in a notebook: the algorithm lives in __main__
    exec(compile(readme_section("Python API"), "README.md", "exec"), namespace)
    board = namespace["board"]
    assert set(board["algo"]) == {"fedavg", "fedper", "fedper_warm"} and (board["seeds"] == 2).all()
    assert namespace["one"].rounds["round"].tolist() == [5]
    assert (tmp_path / "nb_results" / "leaderboard.csv").exists()
    with pytest.raises(pflbench.UserError, match="__main__"):
        pflbench.sweep(["fedper_warm"], alphas=[0.1], seeds=[0], rounds=2, workers=2, results="other")


def comparable_record(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    timing = ("wall_s", "client_s", "server_s", "eval_s")
    return {"config": {k: v for k, v in config.items() if k != "versions"},
            "summary": {k: v for k, v in summary.items() if k not in timing},
            **{name: pd.read_csv(path / name).drop(columns="elapsed_s", errors="ignore").to_dict("list")
               for name in ("rounds.csv", "clients.csv", "partition.csv")}}


def test_python_run_and_cli_run_write_the_same_record(tmp_path):
    args = ["run", "--algo", "fedobp", "--hp", "q=0.99", "--alpha", "0.5", "--seed", "3"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    cli = CliRunner().invoke(app, [*args, "--results", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    result = pflbench.run("fedobp", alpha=0.5, seed=3, hp={"q": 0.99}, results=tmp_path / "api", **TINY)
    (cli_record,) = (tmp_path / "cli" / "runs").iterdir()
    assert result.path.name == cli_record.name
    assert comparable_record(result.path) == comparable_record(cli_record)
    assert result.summary["acc"] == json.loads((cli_record / "summary.json").read_text())["acc"]


def test_in_memory_run_matches_the_written_one(tmp_path):
    kept = pflbench.run("fedper", seed=1, **TINY)
    written = pflbench.run("fedper", seed=1, results=tmp_path, **TINY)
    assert kept.path is None and written.path is not None
    pd.testing.assert_frame_equal(kept.rounds.drop(columns="elapsed_s"), written.rounds.drop(columns="elapsed_s"))
    assert kept.summary["acc"] == written.summary["acc"]


@pytest.mark.parametrize("call, message", [
    (lambda: pflbench.run("nope"), "unknown algorithm 'nope'"),
    (lambda: pflbench.run("fedavg", roundz=3), "unknown setting(s) roundz"),
    (lambda: pflbench.run("fedavg", alpha=0), "--alpha must be > 0"),
    (lambda: pflbench.run("fedprox", hp={"nu": 1}), "no hyperparameter 'nu'"),
    (lambda: pflbench.leaderboard("/nonexistent-results"), "no runs in"),
])
def test_api_mistakes_raise_the_cli_one_liner(call, message):
    with pytest.raises(pflbench.UserError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)

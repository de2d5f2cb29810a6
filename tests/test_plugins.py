"""Algorithms as plugins: registration, --plugin files, broken plugins, hyperparameters."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import make_engine, small_config, without_timing
from pflbench.cli import app
from pflbench.errors import UserError
from pflbench.core.registry import ALGORITHMS, get_algorithm, load_algorithms, resolve_hyperparams

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fedavgm.py"
# every module of the algorithms package is a built-in, and must be declared in the entry points
BUILTINS = {p.stem for p in (Path(__file__).resolve().parents[1] / "algorithms").glob("[!_]*.py")}
TINY = ["--dataset", "digits", "--clients", "4", "--rounds", "2", "--local-epochs", "1", "--eval-every", "1"]


def cli(args, tmp_path):
    return CliRunner().invoke(app, [*args, "--results", str(tmp_path / "results"),
                                    "--data-root", str(tmp_path / "data")])


def test_builtins_register_through_the_entry_point_group():
    from importlib.metadata import entry_points

    declared = {ep.name for ep in entry_points(group="pflbench.algorithms")}
    assert BUILTINS <= declared
    load_algorithms()
    assert BUILTINS <= set(ALGORITHMS)
    for name in BUILTINS:
        cls = ALGORITHMS[name]
        assert cls.description and cls.citation and cls.__module__.startswith("algorithms.")


def test_example_plugin_runs_through_the_cli(tmp_path):
    result = cli(["run", "--plugin", str(EXAMPLE), "--algo", "fedavgm", "--hp", "beta=0.5", *TINY], tmp_path)
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "results" / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["hyperparams"] == {"beta": 0.5, "server_lr": 1.0}
    assert config["config"]["hp"] == {"beta": 0.5, "server_lr": 1.0}


def test_example_plugin_without_momentum_is_fedavg():
    load_algorithms([EXAMPLE])
    config = small_config(rounds=2, join_ratio=0.5)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    fedavgm = make_engine(config.replace(algo="fedavgm"), beta=0.0, server_lr=1.0).run()
    for a, b in zip(without_timing(fedavg.rounds), without_timing(fedavgm.rounds)):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)


def test_plugin_folder_registers_every_file(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from pflbench.core.algorithm import Algorithm\n"
        "from pflbench.core.registry import register_algorithm\n\n"
        "@register_algorithm('mine_folder_algo')\n"
        "class Mine(Algorithm):\n"
        "    description = 'FedAvg under another name.'\n"
        "    citation = 'none'\n")
    load_algorithms([tmp_path])
    assert get_algorithm("mine_folder_algo").description == "FedAvg under another name."


def test_broken_plugin_is_one_line_naming_the_file_and_builtins_still_load(tmp_path):
    broken = tmp_path / "broken_algo.py"
    broken.write_text("import not_a_module_anywhere\n")
    result = CliRunner().invoke(app, ["list", "--plugin", str(broken)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0] and "ModuleNotFoundError" in lines[0]
    listing = CliRunner().invoke(app, ["list"])
    assert listing.exit_code == 0
    assert all(name in listing.output for name in BUILTINS)


def test_missing_plugin_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_algorithms([tmp_path / "nope.py"])


def test_list_shows_hyperparameters_with_defaults():
    result = CliRunner().invoke(app, ["list"])
    assert "--hp q=0.9999" in result.output and "--hp head_epochs=-1" in result.output


@pytest.mark.parametrize("overrides, message", [
    ({"nope": "1"}, "has no hyperparameter 'nope'"),
    ({"q": "high"}, "q takes a float"),
    ({"score": "cosine"}, "score takes one of sqdiff, abs_prod"),
    ({"q": "1.5"}, "q must be in [0, 1]"),
])
def test_bad_hyperparameters_are_user_errors(overrides, message):
    load_algorithms()
    with pytest.raises(UserError) as err:
        resolve_hyperparams(get_algorithm("fedobp"), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hyperparameters_are_typed():
    load_algorithms()
    hp = resolve_hyperparams(get_algorithm("fedobp"), {"q": "0.99", "ema": "0.5", "norm": "layer"})
    assert (hp.q, hp.ema, hp.norm) == (0.99, 0.5, "layer")


def test_a_hyperparameter_added_later_keeps_older_records_matching():
    """A field declared with `added_later` is left out of the recorded hyperparameters, and so of
    the run id, while it holds its default; set to anything else it is recorded. SCAFFOLD's `cv_lr`
    is one: its default run has the id it had before the field existed."""
    import dataclasses

    from pflbench.api import make_config
    from pflbench.core.registry import added_later, recorded_hyperparams
    from pflbench.experiments.config import RunConfig

    @dataclasses.dataclass
    class Hyperparams:
        old: float = 1.0
        new: str = added_later("a")

    assert recorded_hyperparams(Hyperparams()) == {"old": 1.0}
    assert recorded_hyperparams(Hyperparams(old=2.0, new="b")) == {"old": 2.0, "new": "b"}
    load_algorithms()
    default = make_config("scaffold")
    before = RunConfig.from_dict({**default.to_dict(), "hp": {"global_lr": 1.0, "weighting": "uniform"}})
    assert default.run_id() == before.run_id()
    assert make_config("scaffold", hp={"cv_lr": "effective"}).hp["cv_lr"] == "effective"
    assert make_config("scaffold", hp={"cv_lr": "effective"}).run_id() != default.run_id()

"""The command line: a run writes a complete record; bad input is one line and a non-zero exit."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pflbench.cli import app

TINY = ["--dataset", "digits", "--clients", "4", "--rounds", "2", "--local-epochs", "1", "--eval-every", "1"]


def invoke(args, tmp_path):
    return CliRunner().invoke(app, [*args, "--results", str(tmp_path / "results"),
                                    "--data-root", str(tmp_path / "data")] if args[0] == "run" else args)


def test_run_writes_config_summary_rounds_clients_and_partition(tmp_path):
    result = invoke(["run", "--algo", "fedavg", *TINY, "--finetune-epochs", "1", "--device", "cpu"], tmp_path)
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "results" / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("algo", "dataset", "partition", "alpha", "seed", "rounds", "acc", "acc_client_mean",
                "acc_client_std", "acc_client_p10", "best_acc", "wall_s", "comm_up_bytes",
                "comm_down_bytes", "acc_ft", "client_s", "server_s"):
        assert key in summary, key
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["clients"] == 4 and config["device"] == "cpu" and "torch" in config["versions"]
    assert config["threads"] == torch.get_num_threads()  # CPU results repeat bit for bit only at one count
    rounds = pd.read_csv(run / "rounds.csv")
    assert list(rounds["round"]) == [1, 2] and {"train_loss", "elapsed_s", "acc_ft"} <= set(rounds.columns)
    clients = pd.read_csv(run / "clients.csv")
    assert len(clients) == 8 and {"client", "round", "n_test", "correct", "acc", "loss"} <= set(clients.columns)
    part = pd.read_csv(run / "partition.csv")
    assert len(part) == 8 and part.filter(like="class_").to_numpy().sum() == 1797
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--algo", "nope"], "unknown algorithm 'nope'"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--alpha", "-1"], "--alpha must be > 0"),
    (["--clients", "5000"], "use fewer clients"),
    (["--join-ratio", "0"], "--join-ratio must be in (0, 1]"),
    (["--join-ratio", "1.5"], "--join-ratio must be in (0, 1]"),
    (["--partition", "zipf"], "unknown partition 'zipf'"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--model", "fedavgcnn"], "does not fit 8x8 inputs"),
    (["--hp", "q=1"], "fedavg has no hyperparameter 'q'"),
    (["--hp", "novalue"], "--hp expects KEY=VALUE"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--partition", "shards", "--classes-per-client", "11"],
     "--classes-per-client 11 exceeds the 10 classes of digits; pass at most 10 with --partition shards"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = invoke(["run", *TINY, *args], tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pflbench: error:") and message in lines[0], result.stderr


def test_corrupt_npz_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.npz").write_bytes(b"not a zip file at all")
    result = invoke(["run", *TINY, "--dataset", "broken"], tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.npz" in lines[0]


def test_installed_command_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pflbench.cli", "run", "--algo", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown algorithm 'nope'" in proc.stderr


def test_list_shows_datasets_models_and_algorithms(tmp_path):
    result = CliRunner().invoke(app, ["list", "--data-root", str(tmp_path)])
    assert result.exit_code == 0
    for word in ("digits", "cifar10", "fedavgcnn", "mlp", "fedavg", "local"):
        assert word in result.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    result = invoke(["run", *TINY, "--device", "cuda"], tmp_path)
    assert result.exit_code == 2 and "no CUDA GPU is visible" in result.stderr

"""BatchNorm statistics as state (fedavgcnn_bn) and FedBN, which keeps every BN layer local."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import digits16, make_engine, metrics, small_config
from pflbench.core.models import auto_model_name, build_model, norm_state_keys
from pflbench.core.registry import load_algorithms
from pflbench.core.state import get_state, nbytes, subset
from pflbench.errors import UserError
from pflbench.experiments.sweep import build_plan


def bn_config(**changes):
    return small_config(model="fedavgcnn_bn", **changes)


def test_bn_statistics_are_state_and_building_the_model_leaves_them_at_their_init():
    model = build_model("fedavgcnn_bn", (1, 16, 16), 10)
    state = get_state(model)
    norm = norm_state_keys(model)
    assert {k.rsplit(".", 1)[1] for k in norm} == {"weight", "bias", "running_mean", "running_var"}
    assert len(norm) == 8 and set(norm) <= set(state)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    for key in norm:
        if key.endswith("running_mean"):
            assert torch.equal(state[key], torch.zeros_like(state[key]))
        if key.endswith("running_var"):
            assert torch.equal(state[key], torch.ones_like(state[key]))


def test_fedavg_sends_and_averages_bn_statistics():
    engine = make_engine(bn_config(algo="fedavg", rounds=1), digits16())
    initial = dict(engine.global_state)
    result = engine.run()
    sampled = len(engine.schedule[0])
    assert result.summary["comm_up_bytes"] == sampled * nbytes(initial)
    moved = [k for k in norm_state_keys(engine.model) if k.endswith("running_mean")]
    assert all(not torch.equal(engine.global_state[k], initial[k]) for k in moved)


def test_fedbn_keeps_every_bn_layer_on_its_client():
    engine = make_engine(bn_config(algo="fedbn", rounds=2, clients=4), digits16())
    initial = dict(engine.global_state)
    result = engine.run()
    norm = set(norm_state_keys(engine.model))
    shared = [k for k in initial if k not in norm]
    trained = sorted({c for sampled in engine.schedule for c in sampled})
    assert len(trained) >= 2
    a, b = (engine.algo.eval_state(c, engine.global_state) for c in trained[:2])
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], engine.global_state[k]) for k in shared)
    assert all(not torch.equal(a[k], b[k]) for k in norm if "running" in k)
    assert all(torch.equal(engine.global_state[k], initial[k]) for k in norm)  # never averaged
    sends = sum(len(s) for s in engine.schedule)
    shared_bytes = nbytes(subset(initial, shared))
    assert result.summary["comm_up_bytes"] == sends * shared_bytes
    assert result.summary["comm_down_bytes"] == sends * shared_bytes


def test_fedbn_with_a_single_client_is_fedavg():
    fedavg = make_engine(bn_config(algo="fedavg", clients=1, join_ratio=1.0), digits16()).run()
    fedbn = make_engine(bn_config(algo="fedbn", clients=1, join_ratio=1.0), digits16()).run()
    assert metrics(fedbn, with_comm=False) == metrics(fedavg, with_comm=False)


def test_fedbn_on_a_model_without_batchnorm_is_a_one_line_error():
    with pytest.raises(UserError, match="fedavgcnn_bn"):
        make_engine(small_config(algo="fedbn", model="mlp"))


def test_auto_gives_fedbn_a_batchnorm_model_and_fedavg_the_usual_one():
    assert auto_model_name((1, 8, 8), "batchnorm") == "smallcnn_bn"
    assert auto_model_name((1, 28, 28), "batchnorm") == "fedavgcnn_bn"
    assert auto_model_name((1, 8, 8)) == "mlp" and auto_model_name((3, 32, 32)) == "fedavgcnn"
    engine = make_engine(small_config(algo="fedbn", rounds=1))  # digits, --model auto
    assert len(norm_state_keys(engine.model)) == 8
    assert not norm_state_keys(make_engine(small_config(algo="fedavg", model="auto", rounds=1)).model)


def test_a_sweep_gives_fedbn_the_batchnorm_version_of_the_grid_model():
    load_algorithms()
    plan = build_plan("quick", None, {"algos": "fedavg,fedbn"}, [])
    models = {c.algo: c.model for c in plan.configs()}
    assert models == {"fedavg": "mlp", "fedbn": "smallcnn_bn"}
    fmnist = build_plan(None, Path(__file__).resolve().parents[1] / "grids" / "fmnist.toml", {"algos": "fedbn"}, [])
    assert {c.model for c in fmnist.configs()} == {"fedavgcnn_bn"}

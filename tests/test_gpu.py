"""CUDA: every algorithm runs on the GPU and matches its CPU run; sweeps put several runs on one GPU.

Marked `gpu`: they skip where no CUDA device is visible (`python -m pytest -m gpu` runs only them).
CPU and GPU kernels round differently, so two rounds on the two devices agree within a tolerance,
not bit for bit: pooled accuracy within `ACC_TOL` points, loss within `LOSS_RTOL`; what the
algorithms count (bytes sent, sample-gradients) does not depend on rounding and must be equal,
except where a payload's size is chosen by comparing floats (FedSelect's masks), which may flip
an element at a tie.
"""

import pytest
import torch

from helpers import make_engine, small_config

from pflbench.core.registry import ALGORITHMS, load_algorithms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

load_algorithms()
ALGOS = sorted(ALGORITHMS)
ACC_TOL = 3.0  # points of pooled accuracy (digits, 6 clients: one test sample is about 0.2 points)
LOSS_RTOL = 0.05
FLOAT_CHOSEN_PAYLOADS = {"fedselect"}


@pytest.mark.parametrize("algo", ALGOS)
def test_algorithm_on_cuda_matches_its_cpu_run(algo):
    config = small_config(algo=algo, rounds=2, eval_every=1, join_ratio=0.5)
    cpu = make_engine(config).run()
    engine = make_engine(config, device="cuda")
    cuda = engine.run()
    assert all(p.is_cuda for p in engine.model.parameters())
    for a, b in zip(cpu.rounds, cuda.rounds):
        assert abs(a["acc"] - b["acc"]) <= ACC_TOL
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_evals"] == a["grad_evals"]
        if algo in FLOAT_CHOSEN_PAYLOADS:
            assert b["comm_up_bytes"] == pytest.approx(a["comm_up_bytes"], rel=0.01)
        else:
            assert (b["comm_up_bytes"], b["comm_down_bytes"]) == (a["comm_up_bytes"], a["comm_down_bytes"])
    assert cuda.summary["eval_grad_evals"] == cpu.summary["eval_grad_evals"]


@pytest.mark.parametrize("algo", ["fedavg", "fedper", "fedobp"])
def test_bf16_on_cuda_trains(algo):
    fp32 = make_engine(small_config(algo=algo, rounds=3), device="cuda").run()
    bf16 = make_engine(small_config(algo=algo, rounds=3, precision="bf16"), device="cuda").run()
    assert abs(fp32.summary["acc"] - bf16.summary["acc"]) <= 10.0
    assert bf16.summary["train_loss"] == bf16.summary["train_loss"]  # finite, not NaN


def test_a_sweep_puts_several_runs_on_one_gpu(tmp_path):
    from pflbench.experiments.sweep import SweepPlan, run_sweep

    plan = SweepPlan(algos=["fedavg", "fedper"], datasets=["digits"], alphas=[0.5], seeds=[0],
                     settings={"clients": 4, "rounds": 2, "local_epochs": 1})
    outcome = run_sweep(plan, tmp_path, tmp_path / "no-data", workers=2, device="cuda")
    assert len(outcome.ran) == 2 and all(r.ok and r.device.startswith("cuda") for r in outcome.ran)

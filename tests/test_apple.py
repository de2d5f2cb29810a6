"""APPLE (Luo and Wu, IJCAI 2022): the DR vectors' start, the Local boundary, the personalized
combination and its gradients, the regularizer's schedule, exact bytes, order independence and
determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms.apple import APPLE
from helpers import comm_bytes, finite_accuracy, make_engine, metrics, small_config, states_equal
from pflbench.core.state import get_state, nbytes, set_state


def sample_shares(engine):
    counts = torch.tensor([c.n_train for c in engine.clients], dtype=torch.float64)
    return (counts / counts.sum()).to(torch.float32)


def core(engine, cid):
    return engine.algo.unflatten(engine.algo.cores[cid])


# -- the DR vectors --------------------------------------------------------------------------------

def test_p_starts_at_the_sample_shares_and_uniform_is_one_over_n():
    engine = make_engine(small_config(algo="apple"))
    algo, shares, n = engine.algo, sample_shares(engine), len(engine.clients)
    assert algo.p.shape == (n, n)
    assert all(torch.equal(algo.p[i], shares) for i in range(n))  # p_ij = n_j / n (authors' init_pss)
    assert all(algo.p[i, i].item() == shares[i].item() for i in range(n))  # p_ii = n_i / n
    assert torch.equal(algo.p0, shares) and algo.p0.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert len(set(shares.tolist())) > 1  # the clients' shares differ: the test is not of 1/N
    uniform = make_engine(small_config(algo="apple"), init="uniform").algo
    assert torch.equal(uniform.p, torch.full((n, n), 1.0 / n))  # PFLlib's start
    assert torch.equal(uniform.p0, shares)  # the regularizer's anchor stays the sample shares


def test_p_learns_stays_finite_and_evaluation_is_read_only():
    engine = make_engine(small_config(algo="apple", rounds=2, clients=4, join_ratio=0.5), dr_lr=0.01)
    start = engine.algo.p.clone()
    result = engine.run()
    algo = engine.algo
    assert finite_accuracy(result) and torch.isfinite(algo.p).all() and torch.isfinite(algo.cores).all()
    trained = set().union(*map(set, engine.schedule))
    for cid in range(4):
        assert torch.equal(algo.p[cid], start[cid]) == (cid not in trained)  # only trained rows move
    p, cores = algo.p.clone(), algo.cores.clone()
    first = engine.evaluate(3)
    assert engine.evaluate(3) == first
    assert torch.equal(algo.p, p) and torch.equal(algo.cores, cores)
    assert result.summary["apple_p_self_mean"] == pytest.approx(torch.diagonal(p).mean().item())


# -- boundaries ------------------------------------------------------------------------------------

def frozen_one_hot(config, **hp):
    engine = make_engine(config.replace(algo="apple"), dr_lr=0.0, mu=0.0, **hp)
    n = len(engine.clients)
    engine.algo.p = torch.eye(n)
    return engine


def test_p_frozen_at_one_hot_is_exactly_local():
    # p_i = e_i: the personalized model is the client's own core model and its gradient is the
    # core's, so training, evaluation and the kept models match Local bit for bit (bytes differ:
    # APPLE still downloads the core models).
    config = small_config(join_ratio=0.5, rounds=3, clients=4, momentum=0.5, weight_decay=1e-3)
    local = make_engine(config.replace(algo="local"))
    apple = frozen_one_hot(config)
    assert metrics(apple.run(), with_comm=False) == metrics(local.run(), with_comm=False)
    assert torch.equal(apple.algo.p, torch.eye(4))
    for cid, kept in local.algo.kept.items():
        assert states_equal(core(apple, cid), kept)


def test_scale_lr_is_pfllibs_lr_times_n():
    # with p = e_i, scale_lr trains the core model at N times the run's lr: Local at that lr
    # (0.0625 * 4 = 0.25 exactly).
    config = small_config(rounds=2, clients=4, join_ratio=0.5, lr=0.0625)
    local = make_engine(config.replace(algo="local", lr=0.25)).run()
    apple = frozen_one_hot(config, scale_lr=True).run()
    assert metrics(apple, with_comm=False) == metrics(local, with_comm=False)


# -- the personalized model ------------------------------------------------------------------------

def test_personalized_model_is_the_hand_computed_combination():
    engine = make_engine(small_config(algo="apple", clients=4))
    algo = engine.algo
    initial = get_state(engine.model)
    for j in range(4):  # theta_j = j + 1 everywhere
        algo.cores[j] = algo.flatten({k: torch.full_like(t, j + 1.0) for k, t in initial.items()})
    algo.p[2] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    expected = 0.5 * 1 + 0.25 * 2 + 0.125 * 3 + 0.125 * 4  # 1.875, exact in float32
    state = algo.eval_state(2, engine.global_state)
    assert state.keys() == initial.keys()
    assert all(bool((t == expected).all()) for t in state.values())
    model = algo.eval_model(2, engine.global_state)
    assert all(bool((p == expected).all()) for p in model.parameters())
    # in training, the client's own core is the trainable model's tensors: theta_2 = 7 gives
    # 0.5 + 0.5 + 0.125 * 7 + 0.5
    own = [torch.full_like(p, 7.0) for p in engine.model.parameters()]
    trained = algo.combine(2, algo.p[2], own)
    assert all(bool((t == 2.375).all()) for t in trained.values())


def test_evaluation_after_training_is_the_sum_over_the_current_cores():
    engine = make_engine(small_config(algo="apple", rounds=2, clients=4), dr_lr=0.01)
    engine.run()
    algo = engine.algo
    for cid in range(4):
        state = algo.eval_state(cid, engine.global_state)
        for key, value in state.items():
            by_hand = sum(algo.p[cid, j].item() * core(engine, j)[key] for j in range(4))
            torch.testing.assert_close(value, by_hand, rtol=1e-5, atol=1e-6)


def test_gradients_are_p_ii_times_g_and_inner_products_with_the_cores():
    # d/dtheta_i = p_ii g and d/dp_ij = <g, theta_j> + 2 lambda mu (p_ij - p0_j), g the gradient
    # of CE at the personalized model (summation orders differ: float32 rounding).
    engine = make_engine(small_config(algo="apple", clients=4, rounds=4), mu=0.5, L=1.0)
    algo, model, cid = engine.algo, engine.model, 1
    gen = torch.Generator().manual_seed(3)
    for j in range(4):
        algo.cores[j] += 0.05 * torch.randn(algo.cores.shape[1], generator=gen)
    p = torch.tensor([0.1, 0.6, 0.2, 0.3], requires_grad=True)
    set_state(model, core(engine, cid))
    x, y = next(iter(engine.trainer.batches(cid, 1, 1)))
    coef = algo.reg_coef(1)
    assert coef == 0.5
    algo.apple_loss(cid, p, 1)(model, x, y).backward()
    names = [n for n, _ in model.named_parameters()]
    combined = {k: sum(p[j].item() * core(engine, j)[k] for j in range(4)) for k in names}
    reference = make_engine(small_config(algo="fedavg", clients=4)).model
    set_state(reference, combined)
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
    for (name, param), gk in zip(model.named_parameters(), g):
        torch.testing.assert_close(param.grad, 0.6 * gk, rtol=1e-4, atol=1e-7)
    for j in range(4):
        inner = sum((gk * core(engine, j)[k]).sum() for k, gk in zip(names, g)).item()
        expected = inner + 2 * coef * (p[j].item() - algo.p0[j].item())
        assert p.grad[j].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


# -- the regularizer's schedule --------------------------------------------------------------------

@pytest.mark.parametrize("schedule, shape", [
    ("cos", lambda r: (math.cos(math.pi * r / 4) + 1) / 2),
    ("exp", lambda r: 0.001 ** (r / 4)),
    ("linear", lambda r: 1 - r / 4),
])
def test_lambda_decays_over_the_first_L_rounds_then_is_zero(schedule, shape):
    algo = make_engine(small_config(algo="apple", rounds=8), mu=0.2, L=0.5, schedule=schedule).algo
    coefs = [algo.reg_coef(round_) for round_ in range(1, 9)]  # r = round - 1; int(0.5 * 8) = 4
    assert coefs[:4] == pytest.approx([0.2 * shape(r) for r in range(4)])
    assert coefs[0] == pytest.approx(0.2) and coefs[4:] == [0.0] * 4
    assert all(a > b for a, b in zip(coefs[:4], coefs[1:5]))
    off = make_engine(small_config(algo="apple", rounds=8), mu=0.0, L=0.5, schedule=schedule).algo
    assert [off.reg_coef(r) for r in range(1, 9)] == [0.0] * 8


def test_default_L_counts_a_tenth_of_the_rounds():
    algo = make_engine(small_config(algo="apple", rounds=20)).algo  # L = 0.1: 2 rounds
    assert [algo.reg_coef(r) for r in (1, 2, 3)] == pytest.approx([0.1, 0.05, 0.0])


# -- communication ---------------------------------------------------------------------------------

@pytest.mark.parametrize("download, models", [("all", 6), ("others", 5)])
def test_bytes_are_one_core_up_and_the_core_models_down(download, models):
    engine = make_engine(small_config(algo="apple", rounds=2, join_ratio=0.5), download=download)
    result = engine.run()
    full = nbytes(engine.global_state)
    assert full == 4 * sum(p.numel() for p in engine.model.parameters())
    # 2 rounds x 3 sampled clients: one core model up each, N (or N - 1) core models down each
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * models * full)


# -- order independence, determinism, validation ---------------------------------------------------

def test_a_round_reads_the_round_start_cores_whatever_the_client_order():
    config = small_config(algo="apple", rounds=2, clients=4, join_ratio=0.5)
    forward = make_engine(config, dr_lr=0.01)
    backward = make_engine(config, dr_lr=0.01)
    backward.schedule = [list(reversed(s)) for s in backward.schedule]
    a, b = forward.run(), backward.run()
    assert torch.equal(forward.algo.cores, backward.algo.cores) and torch.equal(forward.algo.p, backward.algo.p)
    assert a.clients == b.clients
    # a client not sampled yet still holds the initial core model
    initial = get_state(make_engine(config).model)
    never = set(range(4)) - set().union(*map(set, forward.schedule))
    assert all(states_equal(core(forward, cid), initial) for cid in never)


def test_same_config_twice_gives_identical_runs():
    config = small_config(algo="apple", rounds=2, clients=4, join_ratio=0.5)
    first, second = make_engine(config, dr_lr=0.01), make_engine(config, dr_lr=0.01)
    assert metrics(first.run()) == metrics(second.run())
    assert torch.equal(first.algo.p, second.algo.p) and torch.equal(first.algo.cores, second.algo.cores)


@pytest.mark.parametrize("field, value", [
    ("dr_lr", -0.001), ("dr_lr", float("inf")), ("mu", -0.1), ("mu", float("nan")), ("L", 1.5), ("L", -0.1),
    ("schedule", "step"), ("init", "ones"), ("download", "some"),
])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        APPLE.Hyperparams(**{field: value})

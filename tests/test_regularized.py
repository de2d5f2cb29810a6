"""The proximal-regularization family (FedProx, Ditto, pFedMe): each algorithm's defining
property, checked exactly where the arithmetic allows."""

import math

import pytest
import torch

from helpers import comm_bytes, make_engine, metrics, small_config, states_equal
from pflbench.core.state import get_state, nbytes, set_state, weighted_mean
from pflbench.core.training import cross_entropy


def spy_uploads(algo):
    """Record (received global state, uploaded state) for every client update."""
    seen = []
    start, upload = algo.client_start, algo.upload
    received = {}

    def client_start(cid, g):
        received[cid] = {k: v.clone() for k, v in g.items()}
        return start(cid, g)

    def spy_upload(cid, trained):
        seen.append((cid, received[cid], {k: v.clone() for k, v in trained.items()}))
        return upload(cid, trained)

    algo.client_start, algo.upload = client_start, spy_upload
    return seen


def distance(a, b):
    return math.sqrt(sum(float((a[k] - b[k]).square().sum()) for k in a))


# -- end to end and communication --------------------------------------------------------------

@pytest.mark.parametrize("algo, hp", [("fedprox", {}), ("ditto", {}), ("pfedme", {"k": 2})])
def test_runs_end_to_end_and_sends_the_whole_model_both_ways(algo, hp):
    engine = make_engine(small_config(algo=algo, rounds=2, join_ratio=0.5), **hp)
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert all(math.isfinite(r["acc"]) and 0 <= r["acc"] <= 100 for r in result.rounds)
    assert all(math.isfinite(r["train_loss"]) for r in result.rounds)


# -- FedProx -------------------------------------------------------------------------------------

def test_fedprox_with_mu0_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    fedprox = make_engine(config.replace(algo="fedprox"), mu=0.0).run()
    assert metrics(fedprox) == metrics(fedavg)


def test_fedprox_with_mu_positive_differs_from_fedavg():
    config = small_config(join_ratio=0.5, rounds=2)
    fedavg = make_engine(config.replace(algo="fedavg"))
    fedavg.run()
    fedprox = make_engine(config.replace(algo="fedprox"), mu=1.0)
    fedprox.run()
    assert not states_equal(fedprox.global_state, fedavg.global_state)


def test_fedprox_gradient_is_the_cross_entropy_gradient_plus_mu_times_the_drift():
    engine = make_engine(small_config(algo="fedprox"), mu=0.7)
    algo, model = engine.algo, engine.model
    anchor = {k: v.clone() for k, v in engine.global_state.items()}
    torch.manual_seed(1)
    drifted = {k: v + 0.05 * torch.randn_like(v) for k, v in anchor.items()}
    x, y = next(iter(engine.trainer.batches(0, 1, 1)))

    set_state(model, drifted)
    model.zero_grad()
    cross_entropy(model, x, y).backward()
    ce_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    algo.local_loss(anchor)(model, x, y).backward()
    for n, p in model.named_parameters():
        expected = ce_grads[n] + 0.7 * (drifted[n] - anchor[n])
        # autograd forms 2 * (0.5 * mu) * d and adds it to the CE gradient: equal up to rounding
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)


def test_fedprox_with_huge_mu_keeps_local_models_at_the_global_one():
    lr = 0.05
    config = small_config(algo="fedprox", rounds=1, lr=lr)
    drift = {}
    for mu in (0.0, 1.0 / lr):  # mu = 1/lr: every step lands one CE gradient step from w^t
        engine = make_engine(config, mu=mu)
        seen = spy_uploads(engine.algo)
        engine.run()
        drift[mu] = max(distance(trained, received) for _, received, trained in seen)
    assert drift[1.0 / lr] < 0.25 * drift[0.0]


# -- Ditto ---------------------------------------------------------------------------------------

def test_ditto_with_lam0_personal_models_are_exactly_local():
    config = small_config(join_ratio=0.5, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    ditto = make_engine(config.replace(algo="ditto"), lam=0.0).run()
    assert metrics(ditto, with_comm=False) == metrics(local, with_comm=False)


def test_ditto_global_model_is_fedavg_trained_and_independent_of_lam():
    config = small_config(algo="ditto", join_ratio=0.5, rounds=2)
    runs = {}
    for lam in (0.0, 1.0):
        engine = make_engine(config, lam=lam)
        runs[lam] = (engine, engine.run())
    assert states_equal(runs[0.0][0].global_state, runs[1.0][0].global_state)
    assert runs[0.0][1].clients != runs[1.0][1].clients  # lam acts on the personal models only


def test_ditto_evaluates_the_personal_model_and_eval_is_read_only():
    engine = make_engine(small_config(algo="ditto", join_ratio=0.5, rounds=1), lam=0.5)
    initial = {k: v.clone() for k, v in engine.global_state.items()}
    engine.run()
    algo, g = engine.algo, engine.global_state
    trained = set(algo.personal_models)
    assert len(trained) == 3
    for cid in range(6):
        state = algo.eval_state(cid, g)
        expected = algo.personal_models[cid] if cid in trained else initial
        assert states_equal(state, expected)
        assert states_equal(algo.eval_state(cid, g), state)
        if cid in trained:
            assert not states_equal(state, g) and not states_equal(state, initial)


# -- pFedMe --------------------------------------------------------------------------------------

def spy_aggregate(algo):
    calls = []
    original = algo.aggregate

    def spy(uploads, g):
        before = {k: v.clone() for k, v in g.items()}
        out = original(uploads, g)
        calls.append((before, [u.payload for u in uploads], [u.n_train for u in uploads], out))
        return out

    algo.aggregate = spy
    return calls


def test_pfedme_with_beta1_aggregates_exactly_as_fedavg():
    engine = make_engine(small_config(algo="pfedme", join_ratio=0.5, rounds=2), k=2, beta=1.0)
    calls = spy_aggregate(engine.algo)
    engine.run()
    assert len(calls) == 2
    for before, payloads, weights, out in calls:
        assert states_equal(out, weighted_mean(payloads, weights))
        assert not states_equal(out, before)


def test_pfedme_beta_mixes_the_old_global_model_with_the_mean():
    engine = make_engine(small_config(algo="pfedme", join_ratio=0.5, rounds=1), k=2, beta=0.5)
    calls = spy_aggregate(engine.algo)
    engine.run()
    (before, payloads, weights, out), = calls
    mean = weighted_mean(payloads, weights)
    # 0.5 * g + 0.5 * m == (g + m) * 0.5 exactly: halving is exact in binary floating point
    assert states_equal(out, {k: (before[k] + mean[k]) * 0.5 for k in before})


def test_pfedme_with_lam0_and_one_inner_step_is_exactly_local_for_one_round():
    # lam = 0: theta is plain SGD with step personal_lr from w^t = w^0, one step per batch on the
    # "train" stream, which is Local's first round; everyone joins so everyone is tested with theta
    config = small_config(rounds=1, join_ratio=1.0, lr=0.05)
    local = make_engine(config.replace(algo="local")).run()
    pfedme = make_engine(config.replace(algo="pfedme"), lam=0.0, k=1, personal_lr=0.05).run()
    assert metrics(pfedme, with_comm=False) == metrics(local, with_comm=False)


def test_pfedme_with_k0_returns_exactly_the_received_model():
    engine = make_engine(small_config(algo="pfedme", join_ratio=0.5, rounds=2), k=0)
    seen = spy_uploads(engine.algo)
    engine.run()
    assert len(seen) == 6
    for cid, received, trained in seen:
        assert states_equal(trained, received)
    for cid, received, _ in seen[3:]:
        assert states_equal(engine.algo.personal_models[cid], received)


def test_pfedme_evaluates_theta_or_the_global_model():
    engine = make_engine(small_config(algo="pfedme", join_ratio=0.5, rounds=1), k=2)
    engine.run()
    algo, g = engine.algo, engine.global_state
    assert len(algo.personal_models) == 3
    for cid in range(6):
        expected = algo.personal_models.get(cid, g)
        assert states_equal(algo.eval_state(cid, g), expected)
    cid = next(iter(algo.personal_models))
    assert not states_equal(algo.personal_models[cid], g)
    algo.hp.eval = "global"
    assert states_equal(algo.eval_state(cid, g), g)


def test_pfedme_local_update_moves_towards_theta():
    # one batch, momentum 0: w_local = w^t - lr * lam * (w^t - theta) with theta after K steps
    lr, lam = 0.05, 3.0
    engine = make_engine(small_config(algo="pfedme", lr=lr, batch_size=10_000), lam=lam, k=3)
    algo, model = engine.algo, engine.model
    start = {k: v.clone() for k, v in engine.global_state.items()}
    set_state(model, start)
    algo.local_train(0, model, round_=1)
    theta = algo.personal_models[0]
    local = get_state(model)
    for k in start:
        # the step adds -lr * (lam * (w - theta)) in one fused op; the formula here rounds differently
        torch.testing.assert_close(local[k], start[k] - lr * lam * (start[k] - theta[k]), rtol=1e-5, atol=1e-7)

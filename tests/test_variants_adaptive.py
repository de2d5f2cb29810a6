"""FedALA's evaluation (ALA of the current global model, read-only) and APFL's alpha updates
(the paper's, FL-bench's, FedTorch's): the exact property that defines each variant."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_engine, metrics, small_config, states_equal
from pflbench.core.state import get_state, set_state
from pflbench.core.training import stream_seed


# -- FedALA: evaluation ---------------------------------------------------------------------------

FEDALA = dict(algo="fedala", rounds=3, join_ratio=0.5, eval_every=3)


def fedala_run(**hp):
    engine = make_engine(small_config(**FEDALA), **hp)
    return engine, engine.run()


def kinds_of_clients(engine):
    """Clients with a stored W (trained twice or more), with a local model but no W yet (trained
    once), and never trained."""
    algo = engine.algo
    with_w = sorted(algo.weights)
    without_w = sorted(set(algo.local) - set(algo.weights))
    never = sorted(set(range(len(engine.clients))) - set(algo.local))
    return with_w, without_w, never


def one_ala_epoch_by_hand(engine, cid, round_):
    """ALA(current global, local) from the stored W, one epoch, written out from the paper's rule:
    merged = local + (global - local) * W on the top layer, W <- clip(W - eta * grad * (global -
    local), 0, 1) per mini-batch of an 80% sample drawn from the (seed, round, client,
    "fedala-eval") stream, which then shuffles the sample."""
    algo, g = engine.algo, engine.global_state
    local, top = algo.local[cid], algo.top_keys
    w = {k: algo.weights[cid][k].clone() for k in top}
    idx = engine.clients[cid].train
    gen = torch.Generator().manual_seed(stream_seed(engine.config.seed, round_, cid, "fedala-eval"))
    m = int(len(idx) * 0.8)
    sample = idx[torch.randperm(len(idx), generator=gen)[:m]]
    order = sample[torch.randperm(m, generator=gen)]
    model = copy.deepcopy(engine.model)
    set_state(model, g)
    params = dict(model.named_parameters())
    x, y = engine.trainer.data.x, engine.trainer.data.y
    for take in order.split(engine.config.batch_size):
        set_state(model, {k: torch.lerp(local[k], g[k], w[k]) for k in top})
        loss = F.cross_entropy(model(x[take]), y[take])
        grads = torch.autograd.grad(loss, [params[k] for k in top])
        for k, grad in zip(top, grads):
            w[k] = torch.clamp(w[k] - 1.0 * (grad * (g[k] - local[k])), 0.0, 1.0)
    return {**g, **{k: torch.lerp(local[k], g[k], w[k]) for k in top}}, len(sample)


def test_fedala_evaluates_ala_of_the_current_global_model():
    engine, result = fedala_run()
    algo, g = engine.algo, engine.global_state
    with_w, without_w, never = kinds_of_clients(engine)
    assert with_w and without_w and never  # every branch is exercised
    assert algo.top_keys == algo.head_keys
    expected = {c: g for c in never}
    for cid in with_w:
        expected[cid], _ = one_ala_epoch_by_hand(engine, cid, 3)
        assert not states_equal(expected[cid], algo.local[cid]) and not states_equal(expected[cid], g)
    for cid in without_w:
        # no W yet: as PFLlib's first ALA, W = 1 trained to convergence, on the same sample
        model = copy.deepcopy(engine.model)
        set_state(model, g)
        ones = {k: torch.ones_like(g[k]) for k in algo.top_keys}
        epochs = algo.ala(model, algo.local[cid], ones, *algo.ala_sample(cid, 3, "fedala-eval"), True)
        assert epochs > 1
        expected[cid] = get_state(model)
    for cid in range(6):
        assert states_equal(algo.eval_state(cid, g), expected[cid]), cid
    # the engine's figures are those of these states
    rows = [r for r in result.clients if r["round"] == 3]
    for row in rows:
        model = copy.deepcopy(engine.model)
        set_state(model, expected[row["client"]])
        res = engine.trainer.evaluate(model, row["client"])
        assert (row["correct"], row["loss"]) == (res.correct, res.loss_sum / res.n)


def test_fedala_evaluation_is_read_only_and_deterministic():
    engine, result = fedala_run()
    algo = engine.algo
    local = {c: {k: t.clone() for k, t in s.items()} for c, s in algo.local.items()}
    weights = {c: {k: t.clone() for k, t in s.items()} for c, s in algo.weights.items()}
    first, g = dict(algo.first_ala_epochs), {k: t.clone() for k, t in engine.global_state.items()}
    rows = engine.evaluate(3)
    assert engine.evaluate(3) == rows == [r for r in result.clients if r["round"] == 3]
    assert algo.local.keys() == local.keys() and all(states_equal(algo.local[c], local[c]) for c in local)
    assert algo.weights.keys() == weights.keys()
    assert all(states_equal(algo.weights[c], weights[c]) for c in weights)
    assert algo.first_ala_epochs == first and states_equal(engine.global_state, g)


def test_fedala_evaluation_leaves_training_unchanged_and_eval_local_is_the_old_evaluation():
    ala, ala_result = fedala_run()
    local, local_result = fedala_run(eval="local")
    # the evaluation-time ALA draws nothing from the training streams and keeps nothing
    assert states_equal(ala.global_state, local.global_state)
    assert [r["train_loss"] for r in ala_result.rounds] == [r["train_loss"] for r in local_result.rounds]
    assert ala_result.summary["grad_evals"] == local_result.summary["grad_evals"]
    # eval=local: each client's local model as last trained (the global model if it never trained)
    algo = local.algo
    for row in [r for r in local_result.clients if r["round"] == 3]:
        model = copy.deepcopy(local.model)
        set_state(model, algo.local.get(row["client"], local.global_state))
        res = local.trainer.evaluate(model, row["client"])
        assert (row["correct"], row["loss"]) == (res.correct, res.loss_sum / res.n)
    assert local_result.summary["eval_grad_evals"] == 0
    assert ala_result.summary["eval_grad_evals"] > 0
    assert metrics(ala_result)[1] != metrics(local_result)[1]


def test_fedala_counts_the_evaluation_ala_as_evaluation_compute():
    # every client trains in rounds 1 and 2, so at the only evaluation (round 2) each has a W:
    # one W-learning epoch over its 80% sample
    engine = make_engine(small_config(algo="fedala", rounds=2, join_ratio=1.0, eval_every=2))
    summary = engine.run().summary
    assert set(engine.algo.weights) == set(range(6))
    assert summary["eval_grad_evals"] == sum(int(c.n_train * 0.8) for c in engine.clients)


def test_fedala_defaults_and_declared_evaluation():
    engine = make_engine(small_config(algo="fedala"))
    hp = engine.algo.hp
    assert (hp.threshold, hp.eval, hp.window, hp.rand_percent, hp.eta) == (0.1, "ala", 10, 80.0, 1.0)
    assert engine.algo.eval_adaptation().startswith("ALA of the current global model")
    assert "80.0% of its training data" in engine.algo.eval_adaptation()
    local = make_engine(small_config(algo="fedala"), eval="local").algo
    assert local.eval_adaptation().startswith("none")


# -- APFL: alpha updates --------------------------------------------------------------------------

UPDATES = ["paper", "flbench", "fedtorch"]


_FEDAVG_RUNS: dict = {}


def fedavg_run(config):
    """FedAvg's run under `config` (once per configuration: several tests compare with it)."""
    key = repr(config.replace(algo="fedavg"))
    if key not in _FEDAVG_RUNS:
        _FEDAVG_RUNS[key] = make_engine(config.replace(algo="fedavg")).run()
    return _FEDAVG_RUNS[key]


def trace_alpha(algo):
    """Record, per local_train call, alpha as each step's mixture sees it (before that step's
    update), by wrapping `personal_logits` (called once per step with the live alpha tensor)."""
    trace: list[list[float]] = []
    original_train, original_logits = algo.local_train, algo.personal_logits

    def local_train(cid, model, round_):
        trace.append([])
        out = original_train(cid, model, round_)
        trace[-1].append(algo.alphas[cid])  # after the last step
        return out

    def personal_logits(model, v, alpha, *args, **kwargs):
        trace[-1].append(float(alpha.detach()))
        return original_logits(model, v, alpha, *args, **kwargs)

    algo.local_train, algo.personal_logits = local_train, personal_logits
    return trace


@pytest.mark.parametrize("update", UPDATES)
def test_apfl_alpha_stays_in_the_unit_interval_at_every_step(update):
    engine = make_engine(small_config(algo="apfl", rounds=3, join_ratio=1.0, local_epochs=2),
                         alpha_update=update, alpha_lr=5.0)
    trace = trace_alpha(engine.algo)
    summary = engine.run().summary
    values = [a for call in trace for a in call]
    assert len(trace) == 18 and all(0.0 <= a <= 1.0 for a in values)
    alphas = engine.algo.alphas
    assert set(alphas) == set(range(6)) and all(0.0 <= a <= 1.0 for a in alphas.values())
    assert any(a in (0.0, 1.0) for a in values)  # the clip is exercised
    assert summary["alpha_at_0"] + summary["alpha_at_1"] == sum(a in (0.0, 1.0) for a in alphas.values())


@pytest.mark.parametrize("update, moving_steps", [("paper", "all"), ("flbench", "first epoch"),
                                                  ("fedtorch", "first step")])
def test_apfl_alpha_moves_only_where_its_update_schedule_says(update, moving_steps):
    # round 2 is checked: at a first participation v starts equal to w, so the paper's gradient
    # <v - w, grad CE(v_bar)> is 0 at the first step
    config = small_config(algo="apfl", rounds=2, join_ratio=1.0, local_epochs=2)
    engine = make_engine(config, alpha_update=update, alpha_lr=0.01)
    trace = trace_alpha(engine.algo)
    engine.run()
    assert len(trace) == 12
    for cid, values in zip(engine.schedule[1], trace[6:]):
        per_epoch = math.ceil(engine.clients[cid].n_train / config.batch_size)
        steps = len(values) - 1
        assert steps == 2 * per_epoch and per_epoch > 1
        moved = [values[s + 1] != values[s] for s in range(steps)]  # did step s change alpha?
        expected = {"all": [True] * steps,
                    "first epoch": [True] * per_epoch + [False] * per_epoch,
                    "first step": [True] + [False] * (steps - 1)}[moving_steps]
        assert moved == expected, (update, cid)


@pytest.mark.parametrize("mix", ["params", "logits"])
@pytest.mark.parametrize("update", UPDATES)
def test_apfl_with_alpha_held_at_zero_is_exactly_fedavg_under_every_update(update, mix):
    # alpha learned with step 0 stays at 0 while every update's code runs (FedTorch's extra
    # gradient of the mixture in w included): w must still train exactly as FedAvg's model
    config = small_config(join_ratio=0.5, rounds=2, momentum=0.5, local_epochs=2)
    fedavg = fedavg_run(config)
    for hp in ({"learn_alpha": True, "alpha_lr": 0.0}, {"learn_alpha": False}):
        engine = make_engine(config.replace(algo="apfl"), alpha=0.0, alpha_update=update, mix=mix, **hp)
        assert metrics(engine.run()) == metrics(fedavg)
        assert engine.algo.personal and all(a == 0.0 for a in engine.algo.alphas.values())


@pytest.mark.parametrize("update, mix", [("paper", "params"), ("paper", "logits"), ("flbench", "params"),
                                         ("flbench", "logits"), ("fedtorch", "params"), ("fedtorch", "logits")])
def test_apfl_counts_two_passes_per_batch(update, mix):
    config = small_config(rounds=2, join_ratio=0.5, local_epochs=2)
    fedavg = fedavg_run(config).summary
    engine = make_engine(config.replace(algo="apfl"), alpha_update=update, mix=mix)
    summary = engine.run().summary
    extra = 0
    if update == "fedtorch" and mix == "logits":
        # the mixture's gradient in w is a second backward through w, on each round's first batch
        extra = sum(min(config.batch_size, engine.clients[c].n_train) for r in engine.schedule for c in r)
    assert summary["grad_evals"] == 2 * fedavg["grad_evals"] + extra
    assert summary["eval_grad_evals"] == 0


def test_apfl_reference_alpha_formula():
    # <v - w, alpha * grad_v + (1 - alpha) * grad_w> + 0.02 * alpha, then alpha -= lr * that
    engine = make_engine(small_config(algo="apfl"), alpha_update="flbench", alpha_lr=0.3)
    algo, model = engine.algo, engine.model
    torch.manual_seed(3)
    v = {}
    for k, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        v[k] = (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_(True)
        v[k].grad = torch.randn_like(p)
    alpha = torch.tensor(0.4)
    expected = 0.02 * alpha
    for k, p in model.named_parameters():
        expected = expected + ((v[k] - p) * (alpha * v[k].grad + (1 - alpha) * p.grad)).sum()
    expected = torch.clamp(alpha - 0.3 * expected, 0.0, 1.0).item()
    algo.step_alpha(alpha, model, v, None)
    assert alpha.item() == pytest.approx(expected, rel=1e-6)
    assert alpha.item() != 0.4
    # FedTorch's w gradient replaces w's own: passing w's own gradients gives the same step
    again = torch.tensor(0.4)
    algo.step_alpha(again, model, v, [p.grad for p in model.parameters()])
    assert again.item() == alpha.item()


def test_apfl_fedtorch_uses_the_mixture_gradient_in_w():
    # mix=params: d CE(alpha v + (1 - alpha) w) / dw = (1 - alpha) / alpha * d/dv of the same
    engine = make_engine(small_config(algo="apfl", rounds=1, join_ratio=0.5), alpha_update="fedtorch", alpha=0.3)
    algo = engine.algo
    seen = []
    original = algo.step_alpha

    def spy(alpha, model, v, w_grads):
        seen.append((float(alpha), [t.grad.clone() for t in v.values()], w_grads))
        return original(alpha, model, v, w_grads)

    algo.step_alpha = spy
    engine.run()
    assert len(seen) == 3
    for a, v_grads, w_grads in seen:
        assert a == pytest.approx(0.3) and w_grads is not None
        for gv, gw in zip(v_grads, w_grads):
            assert torch.allclose(gw * a, gv * (1 - a), rtol=1e-4, atol=1e-7)


def test_apfl_summary_is_the_distribution_over_clients_that_trained():
    engine = make_engine(small_config(algo="apfl", rounds=1, join_ratio=0.5), alpha_lr=5.0)
    summary = engine.run().summary
    alphas = engine.algo.alphas
    assert sorted(alphas) == engine.schedule[0]  # only the sampled clients hold an alpha
    a = np.array(list(alphas.values()))
    p10, p50, p90 = np.quantile(a, [0.1, 0.5, 0.9])
    assert summary["alpha_mean"] == float(a.mean())
    assert (summary["alpha_min"], summary["alpha_max"]) == (a.min(), a.max())
    assert (summary["alpha_p10"], summary["alpha_p50"], summary["alpha_p90"]) == (p10, p50, p90)
    assert summary["alpha_at_0"] == int((a == 0).sum()) and summary["alpha_at_1"] == int((a == 1).sum())
    assert summary["alpha_at_0"] + summary["alpha_at_1"] > 0

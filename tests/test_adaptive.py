"""Adaptive personalization family (APFL, Per-FedAvg, FedALA): exact properties, bytes, runs."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import comm_bytes, finite_accuracy, make_engine, metrics, small_config, states_equal
from pflbench.core.state import get_state, nbytes, set_state, subset, weighted_mean


# -- APFL -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mix", ["params", "logits"])
def test_apfl_with_alpha_fixed_at_zero_is_exactly_fedavg(mix):
    # alpha weights the personal model (the paper's convention): alpha = 0 selects the global
    # model, and w trains exactly as FedAvg's model, so every figure matches bit for bit.
    config = small_config(join_ratio=0.5, rounds=3, momentum=0.5)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    engine = make_engine(config.replace(algo="apfl"), alpha=0.0, learn_alpha=False, mix=mix)
    apfl = engine.run()
    assert metrics(apfl) == metrics(fedavg)
    assert engine.algo.personal and all(a == 0.0 for a in engine.algo.alphas.values())


def test_apfl_sends_the_global_model_both_ways():
    engine = make_engine(small_config(algo="apfl", rounds=2, join_ratio=0.5))
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)


def test_apfl_learns_alpha_in_the_unit_interval_and_evaluation_is_read_only():
    engine = make_engine(small_config(algo="apfl", rounds=3))
    result = engine.run()
    assert finite_accuracy(result)
    algo, g = engine.algo, engine.global_state
    assert all(0.0 <= a <= 1.0 for a in algo.alphas.values())
    assert any(a != 0.5 for a in algo.alphas.values())
    personal = {c: dict(v) for c, v in algo.personal.items()}
    alphas = dict(algo.alphas)
    first = engine.evaluate(4)
    assert engine.evaluate(4) == first
    assert algo.alphas == alphas and all(states_equal(algo.personal[c], personal[c]) for c in personal)
    a, v = algo.alphas[0], algo.personal[0]
    assert states_equal(algo.eval_state(0, g), {k: v[k] * a + g[k] * (1 - a) for k in g})


def test_apfl_alpha_gradient_is_the_papers_inner_product():
    # d/dalpha CE(alpha v + (1 - alpha) w) = <v - w, grad CE(v_bar)>; summation orders differ,
    # so this is checked to float32 rounding, not bit for bit.
    engine = make_engine(small_config(algo="apfl"))
    algo, model = engine.algo, engine.model
    torch.manual_seed(1)
    w = get_state(model)
    v = {k: (t + 0.05 * torch.randn_like(t)).requires_grad_(True) for k, t in w.items()}
    alpha = torch.tensor(0.3, requires_grad=True)
    x, y = next(iter(engine.trainer.batches(0, 1, 1)))
    F.cross_entropy(algo.personal_logits(model, v, alpha, x, None), y).backward()
    mixed = {k: (0.3 * v[k] + 0.7 * w[k]).detach() for k in w}
    set_state(model, mixed)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    expected = sum(((v[k].detach() - w[k]) * g).sum() for k, g in zip(names, grads))
    assert alpha.grad.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)


# -- Per-FedAvg ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_with_alpha_zero_is_exactly_fedavg(variant):
    # alpha = 0: temp = w, (I - 0 * H) g = g, and evaluation is the global model; beta = lr and
    # sample weighting make the run FedAvg's, bit for bit.
    config = small_config(join_ratio=0.5, rounds=3, momentum=0.5)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    per = make_engine(config.replace(algo="perfedavg"), alpha=0.0, variant=variant, weighting="samples").run()
    assert metrics(per) == metrics(fedavg)


def test_perfedavg_evaluates_one_alpha_step_from_the_global_model():
    engine = make_engine(small_config(algo="perfedavg", rounds=1), alpha=0.05)
    engine.run()
    algo, g = engine.algo, engine.global_state
    state = algo.eval_state(2, g)
    assert states_equal(algo.eval_state(2, g), state)
    model = copy.deepcopy(engine.model)
    set_state(model, g)
    x, y = algo.adaptation_batch(2)
    assert len(y) == engine.config.batch_size
    assert torch.isin(y, engine.trainer.data.y[engine.clients[2].train]).all()
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    expected = {n: g[n] - 0.05 * gr for (n, _), gr in zip(model.named_parameters(), grads)}
    assert state.keys() == expected.keys()
    # p.add_(g, alpha=-a) may round differently from p - a * g: a one-ulp tolerance
    assert all(torch.allclose(state[k], expected[k], rtol=1e-6, atol=1e-8) for k in state)
    assert not states_equal(state, g)
    algo.hp.alpha = 0.0
    assert states_equal(algo.eval_state(2, g), g)


def test_perfedavg_hessian_vector_product_matches_autograd():
    # central differences (default delta 1e-4): O(delta^2) truncation plus float32 rounding, so
    # not exact; a radius this small also keeps the ReLU activation pattern fixed
    engine = make_engine(small_config(algo="perfedavg", rounds=1), variant="hf")
    engine.run()
    algo, model = engine.algo, engine.model
    set_state(model, engine.global_state)
    before = get_state(model)
    params = list(model.parameters())
    x, y = next(iter(engine.trainer.batches(1, 1, 5)))
    vec = [t.detach() for t in torch.autograd.grad(F.cross_entropy(model(x[:8]), y[:8]), params)]
    hv = torch.cat([h.flatten() for h in algo.hessian_vector(model, params, x, y, vec)])
    assert states_equal(get_state(model), before)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    exact = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vec)), params)
    exact = torch.cat([h.flatten() for h in exact])
    assert torch.nn.functional.cosine_similarity(hv, exact, dim=0) > 0.999
    assert (hv.norm() / exact.norm()).item() == pytest.approx(1.0, abs=1e-2)


def test_perfedavg_averages_the_sampled_models_uniformly():
    engine = make_engine(small_config(algo="perfedavg", rounds=1))
    algo = engine.algo
    uploads = []
    original = algo.aggregate
    algo.aggregate = lambda ups, g: uploads.extend(ups) or original(ups, g)
    engine.run()
    assert len({u.n_train for u in uploads}) > 1
    payloads = [u.payload for u in uploads]
    assert states_equal(engine.global_state, weighted_mean(payloads, [1.0] * len(uploads)))
    assert not states_equal(engine.global_state, weighted_mean(payloads, [u.n_train for u in uploads]))


def test_perfedavg_sends_the_whole_model_both_ways_and_runs():
    engine = make_engine(small_config(algo="perfedavg", rounds=2, join_ratio=0.5), variant="hf")
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert finite_accuracy(result)


# -- FedALA ----------------------------------------------------------------------------------------

def test_fedala_with_weights_fixed_at_one_starts_from_the_global_model_and_trains_as_fedavg():
    config = small_config(join_ratio=0.5, rounds=4)
    fedavg_engine = make_engine(config.replace(algo="fedavg"))
    fedavg = fedavg_engine.run()
    engine = make_engine(config.replace(algo="fedala"), eta=0.0)
    algo = engine.algo
    starts = []
    original = algo.adapt

    def spy(cid, model, round_):
        received = get_state(model)
        epochs = original(cid, model, round_)
        starts.append((epochs, states_equal(get_state(model), received)))
        return epochs

    algo.adapt = spy
    result = engine.run()
    assert len(starts) == 12 and all(same for _, same in starts)
    assert any(epochs > 0 for epochs, _ in starts)  # ALA ran (second participations)
    assert algo.weights and all(torch.all(w == 1) for ws in algo.weights.values() for w in ws.values())
    assert states_equal(engine.global_state, fedavg_engine.global_state)
    assert [r["train_loss"] for r in result.rounds] == [r["train_loss"] for r in fedavg.rounds]
    assert comm_bytes(result) == comm_bytes(fedavg)
    # evaluation (default eval=ala) merges with W = 1 too, so it tests the global model: every
    # figure is FedAvg's (only the compute differs: the evaluation-time W-learning is counted)
    assert metrics(result) == metrics(fedavg)
    assert result.summary["eval_grad_evals"] > 0 and fedavg.summary["eval_grad_evals"] == 0


def test_fedala_first_participation_starts_from_the_global_model():
    engine = make_engine(small_config(algo="fedala", rounds=1))
    algo, model = engine.algo, engine.model
    g = engine.global_state
    set_state(model, g)
    assert algo.adapt(0, model, round_=1) == 0
    assert states_equal(get_state(model), g) and not algo.weights
    engine.run()
    assert not algo.weights and set(algo.local) == set(range(6))


def test_fedala_learned_start_keeps_lower_layers_global_and_top_between_local_and_global():
    engine = make_engine(small_config(algo="fedala", rounds=2))
    result = engine.run()
    algo, model, g = engine.algo, engine.model, engine.global_state
    assert algo.top_keys == algo.head_keys
    assert set(algo.weights) == set(range(6))
    assert 1 <= result.summary["ala_first_epochs_max"] <= 50
    set_state(model, g)
    assert algo.adapt(3, model, round_=3) == 1  # after the first ALA: one epoch
    start, local = get_state(model), algo.local[3]
    lower = [k for k in g if k not in algo.top_keys]
    assert states_equal(subset(start, lower), subset(g, lower))
    weights = algo.weights[3]
    assert all(((w >= 0) & (w <= 1)).all() for w in weights.values())
    assert any((w < 1).any() for w in weights.values())
    for k in algo.top_keys:
        low, high = torch.minimum(local[k], g[k]), torch.maximum(local[k], g[k])
        assert ((start[k] >= low - 1e-6) & (start[k] <= high + 1e-6)).all()  # lerp rounding
        assert torch.equal(start[k], torch.lerp(local[k], g[k], weights[k]))


def test_fedala_layers_count_modules_from_the_output():
    config = small_config(algo="fedala")
    assert make_engine(config, layers=0).algo.top_keys == make_engine(config).algo.all_keys
    two = make_engine(config, layers=2).algo
    assert two.top_keys == ("body.3.weight", "body.3.bias", *two.head_keys)


def test_fedala_sends_the_whole_model_both_ways_and_eval_local_evaluates_the_local_model():
    # the default evaluation (ALA of the current global model) is tested in test_variants_adaptive
    engine = make_engine(small_config(algo="fedala", rounds=2, join_ratio=0.5), eval="local")
    result = engine.run()
    algo, g = engine.algo, engine.global_state
    full = nbytes(g)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert finite_accuracy(result)
    for cid in range(6):
        expected = algo.local[cid] if cid in algo.local else g
        assert states_equal(algo.eval_state(cid, g), expected)

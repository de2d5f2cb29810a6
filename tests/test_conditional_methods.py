"""Feature-conditioning methods: FedCP (a conditional policy splits each feature between a personal
and a global head) and GPFL (a conditional valve with global category embeddings), each checked on
an exact property of its definition, its exact communication bytes, determinism and read-only
evaluation, and its hyperparameter validation."""

import dataclasses
import math

import pytest
import torch

from helpers import capture_uploads, comm_bytes, first_digits16, make_engine, metrics, small_config, states_equal
from pflbench.core.registry import get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.core.state import get_state, set_state, subset
from pflbench.errors import UserError

FLOAT = 4  # bytes per float32


def numel(module):
    return sum(p.numel() for p in module.parameters())


def logits_on_test(engine, model, cid):
    model.eval()
    with torch.no_grad():
        return model(engine.trainer.data.x[engine.clients[cid].test])


def a_batch(engine, cid=0, n=16):
    return engine.trainer.data.x[engine.clients[cid].train[:n]], engine.trainer.data.y[engine.clients[cid].train[:n]]


def assert_shared_identical_personal_different(engine, uploads):
    """Every client starts from the same shared tensors (the global ones); the personal ones are
    never uploaded and differ between the clients that trained."""
    algo, g = engine.algo, engine.global_state
    assert all(set(u.payload) == set(algo.shared_keys) for r in uploads for u in r)
    assert not set(algo.personal_keys) & {k for r in uploads for u in r for k in u.payload}
    sampled = sorted({u.cid for r in uploads for u in r})
    assert sorted(algo.kept) == sampled
    starts = [algo.client_start(cid, g) for cid in range(len(engine.clients))]
    for start in starts:
        assert states_equal(subset(start, algo.shared_keys), subset(g, algo.shared_keys))
    for i, a in enumerate(sampled):
        for b in sampled[i + 1:]:
            assert not states_equal(algo.kept[a], algo.kept[b])
    return sampled


def deterministic_run_with_read_only_evaluation(name):
    """Two runs of the same config give the same metrics, and evaluating every client twice gives the
    same logits and leaves the global state and every kept personal state untouched. Returns the
    engine after its run."""
    config = small_config(algo=name, rounds=2, clients=4, join_ratio=0.5)
    first = make_engine(config)
    assert metrics(first.run()) == metrics(make_engine(config).run())
    algo, g = first.algo, first.global_state
    g_before = {k: v.clone() for k, v in g.items()}
    kept_before = {c: {k: v.clone() for k, v in s.items()} for c, s in algo.kept.items()}
    for cid in range(config.clients):
        once = logits_on_test(first, algo.eval_model(cid, g), cid)
        assert torch.equal(once, logits_on_test(first, algo.eval_model(cid, g), cid))
    assert states_equal(g, g_before)
    assert all(states_equal(algo.kept[c], kept_before[c]) for c in kept_before)
    return first


# == FedCP ===========================================================================================

def test_fedcp_policy_splits_every_feature_into_shares_that_sum_back_to_it():
    from algorithms.fedcp import EpochNoise

    engine = make_engine(small_config(algo="fedcp"))
    model = engine.model
    head = model.head
    x, _ = a_batch(engine)
    with torch.no_grad():
        z = model.body(x)
        head.set_context()
        r, s = head.policy(z)
        # s + (1 - s) = 1 elementwise: the personal and global shares partition every coordinate
        assert r.shape == s.shape == z.shape
        assert torch.allclose(r + s, torch.ones_like(r), rtol=0, atol=1e-6)
        assert bool(((r >= 0) & (r <= 1)).all())
        assert torch.allclose(z * r + z * s, z, rtol=0, atol=1e-6)
        # the prediction is exactly h_i(z * r) + g(z * s)
        assert torch.equal(head(z), head.personal_head(z * r) + head.global_head(z * s))
        # Gumbel noise moves the split, never the sum
        gen = torch.Generator().manual_seed(0)
        head.noise = EpochNoise(gen, len(z), head.dim, z.device)
        r_noisy, s_noisy = head.policy(z)
        head.noise = None
        assert not torch.allclose(r_noisy, r)
        assert torch.allclose(r_noisy + s_noisy, torch.ones_like(r), rtol=0, atol=1e-6)


def test_fedcp_conditioning_vector_is_the_normalized_column_sum_of_the_personal_head():
    from algorithms.fedcp import conditioning_vector

    weight = torch.tensor([[1.0, 2.0, 0.0], [3.0, -6.0, 0.0]])  # column sums (4, -4, 0)
    expected = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2.0)
    assert torch.allclose(conditioning_vector(weight), expected, rtol=0, atol=1e-7)


def test_fedcp_mmd_is_zero_on_equal_samples_and_matches_a_hand_computation():
    from algorithms.fedcp import RBF_WIDTHS, mmd_rbf

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen)
    assert mmd_rbf(x, x).item() == 0.0
    assert mmd_rbf(x, x + 1.0).item() > 0.0
    # one point each at distance 1: K(a, a) = K(b, b) = 4 (one per width), K(a, b) = sum exp(-1/(2w))
    hand = 8.0 - 2.0 * sum(math.exp(-0.5 / w) for w in RBF_WIDTHS)
    assert mmd_rbf(torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx(hand, rel=1e-6)


def test_fedcp_trains_under_a_frozen_global_head_and_uploads_its_mix_with_the_personal_head():
    engine = make_engine(small_config(algo="fedcp", local_epochs=2), head_mix=0.25)
    algo, model, g = engine.algo, engine.model, engine.global_state
    set_state(model, algo.client_start(0, g))
    algo.local_train(0, model, round_=1)
    trained = get_state(model)
    # the global head did not move; the personal head, the body and the CPN did
    assert states_equal(subset(trained, algo.global_head_keys), subset(g, algo.global_head_keys))
    for keys in (algo.personal_head_keys, algo.body_keys):
        assert not states_equal(subset(trained, keys), subset(g, keys))
    cpn = [k for k in algo.shared_keys if k.startswith("head.cpn.")]
    assert cpn and not states_equal(subset(trained, cpn), subset(g, cpn))
    payload = algo.upload(0, trained)
    assert set(payload) == set(algo.shared_keys)
    assert states_equal(algo.kept[0], subset(trained, algo.personal_head_keys))
    for gk, pk in zip(algo.global_head_keys, algo.personal_head_keys):
        assert torch.equal(payload[gk], trained[pk] * 0.25 + g[gk] * 0.75)


def test_fedcp_global_head_becomes_the_mix_of_the_mean_personal_head_and_the_old_one():
    engine = make_engine(small_config(algo="fedcp", rounds=1, clients=4), head_mix=0.3)
    algo = engine.algo
    before = {k: engine.global_state[k].clone() for k in algo.global_head_keys}
    engine.run()
    n = {cid: engine.clients[cid].n_train for cid in range(4)}
    total = sum(n.values())
    for gk, pk in zip(algo.global_head_keys, algo.personal_head_keys):
        mean_personal = sum(algo.kept[cid][pk] * (n[cid] / total) for cid in range(4))
        expected = 0.3 * mean_personal + 0.7 * before[gk]
        assert torch.allclose(engine.global_state[gk], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(engine.global_state[gk], before[gk], rtol=0, atol=1e-4)


def test_fedcp_keeps_personal_heads_home_and_counts_exactly_its_bytes():
    config = small_config(algo="fedcp", rounds=2, join_ratio=0.5)
    engine = make_engine(config)
    uploads = capture_uploads(engine.algo)
    result = engine.run()
    assert [len(r) for r in uploads] == [3, 3]
    assert_shared_identical_personal_different(engine, uploads)
    # bytes from the modules' sizes: body + one head (D x C + C) + CPN (Linear(D, 2D), LayerNorm(2D))
    d, c = engine.model.head.personal_head.in_features, 10
    assert d == 200
    per_client = FLOAT * (numel(engine.model.body) + d * c + c + (d * 2 * d + 2 * d) + 2 * (2 * d))
    assert per_client == 545_640
    assert comm_bytes(result) == (2 * 3 * per_client, 2 * 3 * per_client)


def test_fedcp_is_deterministic_and_its_evaluation_is_read_only():
    first = deterministic_run_with_read_only_evaluation("fedcp")
    algo, g = first.algo, first.global_state
    g_before = {k: v.clone() for k, v in g.items()}
    # with Gumbel noise at evaluation too (the references' choice) it is seeded per client: repeatable
    plain = logits_on_test(first, algo.eval_model(0, g), 0)
    algo.hp = dataclasses.replace(algo.hp, noise="always")
    noisy = logits_on_test(first, algo.eval_model(0, g), 0)
    assert torch.equal(noisy, logits_on_test(first, algo.eval_model(0, g), 0))
    assert not torch.equal(noisy, plain)
    assert states_equal(g, g_before)


def test_fedcp_without_mmd_never_runs_the_reference_body_and_differs_from_the_default():
    config = small_config(algo="fedcp", rounds=1, clients=4)
    engine = make_engine(config, lam=0.0)
    calls = []
    engine.algo.reference_body.register_forward_hook(lambda *args: calls.append(1))
    plain = engine.run()
    assert calls == []
    assert plain.rounds[0]["train_loss"] != make_engine(config).run().rounds[0]["train_loss"]


# == GPFL ============================================================================================

def test_gpfl_guidance_losses_match_a_hand_computation():
    from algorithms.gpfl import angle_loss, magnitude_loss

    emb = torch.eye(3)
    feats = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # cosines (1, 0, 0) and (0, 0, 1)
    y = torch.tensor([1, 2])
    hand = (math.log(math.e + 2.0) + math.log(1.0 + 2.0 / math.e)) / 2  # target cosine 0, then 1
    assert angle_loss(feats, y, emb).item() == pytest.approx(hand, rel=1e-6)
    # the L2 norm of the whole difference matrix: rows (2, -1, 0) and (0, 0, 2)
    assert magnitude_loss(feats, emb[y]).item() == pytest.approx(3.0, rel=1e-6)


def test_gpfl_conditional_inputs_are_the_mean_and_the_label_weighted_embeddings():
    engine = make_engine(small_config(algo="gpfl"))
    algo = engine.algo
    emb = engine.model.head.gce.weight.detach()
    for cid in range(3):
        counts = torch.bincount(engine.trainer.data.y[engine.clients[cid].train], minlength=10).double()
        generic, personal = algo.conditions(cid, emb)
        assert torch.allclose(generic.double(), emb.double().mean(0), rtol=0, atol=1e-6)
        expected = sum(counts[c] / counts.sum() * emb[c].double() for c in range(10))
        assert torch.allclose(personal.double(), expected, rtol=0, atol=1e-6)


def test_gpfl_with_a_closed_valve_predicts_with_its_body_and_personal_head_alone():
    """A valve whose tensors are all zero gives gamma = beta = 0 (the LayerNorm of a constant vector
    is its bias), so CoV(z, c) = ReLU(z) = z on the body's non-negative features: the predictor is
    exactly FedPer's, head_i(body(x))."""
    engine = make_engine(small_config(algo="gpfl", rounds=1))
    engine.run()
    algo, g = engine.algo, dict(engine.global_state)
    valve = [k for k, _ in engine.model.head.cov.named_parameters(prefix="head.cov")]
    assert len(valve) == 8 and set(valve) <= set(algo.shared_keys)
    for k in valve:
        g[k] = torch.zeros_like(g[k])
    model, x = engine.model, engine.trainer.data.x
    for cid in range(3):
        closed = logits_on_test(engine, algo.eval_model(cid, g), cid)
        with torch.no_grad():
            plain = model.head.classifier(model.body(x[engine.clients[cid].test]))
        assert torch.equal(closed, plain)
    # the trained valve does act: the same client's predictions differ from body + head alone
    gpfl = logits_on_test(engine, algo.eval_model(0, engine.global_state), 0)
    with torch.no_grad():
        plain = model.head.classifier(model.body(x[engine.clients[0].test]))
    assert not torch.allclose(gpfl, plain, rtol=0, atol=1e-3)


def test_gpfl_weight_decay_mu_applies_to_the_embeddings_and_the_valve_only():
    engine = make_engine(small_config(algo="gpfl", weight_decay=0.01), mu=0.5)
    algo, model = engine.algo, engine.model
    task, guide = algo.optimizer(model).param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)] for p in guide["params"]} == set(algo.shared_keys) - set(algo.body_keys)
    assert {named[id(p)] for p in task["params"]} == {*algo.body_keys, *algo.personal_keys}
    assert task["weight_decay"] == 0.01 and guide["weight_decay"] == pytest.approx(0.51)
    assert task["lr"] == guide["lr"] == 0.05


def test_gpfl_keeps_personal_heads_home_and_counts_exactly_its_bytes():
    config = small_config(algo="gpfl", rounds=2, join_ratio=0.5)
    engine = make_engine(config)
    uploads = capture_uploads(engine.algo)
    result = engine.run()
    assert [len(r) for r in uploads] == [3, 3]
    assert_shared_identical_personal_different(engine, uploads)
    assert set(engine.algo.personal_keys) == {"head.classifier.weight", "head.classifier.bias"}
    # bytes: body + GCE (C x D) + CoV (two of Linear(D, D) and LayerNorm(D))
    d, c = engine.model.head.classifier.in_features, 10
    per_client = FLOAT * (numel(engine.model.body) + c * d + 2 * (d * d + d + 2 * d))
    assert per_client == 545_600
    assert comm_bytes(result) == (2 * 3 * per_client, 2 * 3 * per_client)


def test_gpfl_is_deterministic_and_its_evaluation_is_read_only():
    deterministic_run_with_read_only_evaluation("gpfl")


# == both ============================================================================================

@pytest.mark.parametrize("algo, per_client", [
    ("fedcp", lambda body, d, c: body + d * c + c + 2 * d * d + 6 * d),
    ("gpfl", lambda body, d, c: body + c * d + 2 * (d * d + 3 * d)),
])
def test_reads_the_feature_size_from_the_conv_models(algo, per_client):
    data16 = first_digits16()
    for model, d in (("fedavgcnn", 512), ("lenet5", 84)):
        config = small_config(algo=algo, rounds=1, clients=2, model=model)
        engine = make_engine(config, data=data16)
        result = engine.run()
        assert math.isfinite(result.summary["acc"]) and math.isfinite(result.summary["loss"])
        expected = FLOAT * per_client(numel(engine.model.body), d, 10)
        assert comm_bytes(result) == (2 * expected, 2 * expected)


@pytest.mark.parametrize("algo, overrides, message", [
    ("fedcp", {"lam": "-1"}, "lam must be a finite number >= 0 (got -1.0)"),
    ("fedcp", {"lam": "inf"}, "lam must be a finite number >= 0 (got inf)"),
    ("fedcp", {"tau": "0"}, "tau must be a finite number > 0 (got 0.0)"),
    ("fedcp", {"head_mix": "1.5"}, "head_mix must be in [0, 1] (got 1.5)"),
    ("fedcp", {"noise": "test"}, "noise takes one of train, always, never"),
    ("gpfl", {"lam": "-0.01"}, "lam must be a finite number >= 0 (got -0.01)"),
    ("gpfl", {"mu": "nan"}, "mu must be a finite number >= 0 (got nan)"),
])
def test_bad_hyperparameters_are_user_errors(algo, overrides, message):
    load_algorithms()
    with pytest.raises(UserError) as err:
        resolve_hyperparams(get_algorithm(algo), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_search_spaces_and_declarations():
    from pflbench.core.search import Real, search_space

    load_algorithms()
    fedcp, gpfl = get_algorithm("fedcp"), get_algorithm("gpfl")
    assert fedcp.Hyperparams().lam == 5.0 and fedcp.Hyperparams().head_mix == 0.5
    assert gpfl.Hyperparams().lam == 0.01 and gpfl.Hyperparams().mu == 0.1
    assert search_space(fedcp.Hyperparams) == {"lam": Real(0.5, 50.0, log=True)}
    assert search_space(gpfl.Hyperparams) == {"lam": Real(1e-4, 0.1, log=True), "mu": Real(0.01, 1.0, log=True)}
    assert "Gumbel noise: train" in fedcp.describe_eval_adaptation(fedcp.Hyperparams())
    for cls in (fedcp, gpfl):
        assert "personal head" in cls.describe_client_state(cls.Hyperparams())

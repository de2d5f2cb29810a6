"""Alignment methods: FedAS (parameter alignment, Fisher-weighted body mean) and FedPAC (feature
alignment to global prototypes, QP-weighted head combination), each checked on an exact property of
its definition, a boundary at which it is an existing algorithm bit for bit, its exact bytes and
sample-gradients, determinism, and its hyperparameter validation."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import comm_bytes, digits16, make_engine, metrics, small_config, states_equal
from pflbench.core.registry import get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.core.state import get_state, nbytes, set_state, subset
from pflbench.errors import UserError

load_algorithms()
from algorithms.fedas import FISHER, alignment_loss  # noqa: E402
from algorithms.fedpac import COUNTS, H, PROTOS, V, combination_weights, feature_statistics, simplex_qp  # noqa: E402


def samples_trained(engine) -> int:
    return sum(engine.clients[cid].n_train for sampled in engine.schedule for cid in sampled)


def spy_accumulate(algo):
    """Record a copy of every upload as the aggregation receives it."""
    seen, original = [], algo.accumulate

    def spy(acc, upload):
        seen.append((upload.cid, upload.n_train, {k: v.clone() for k, v in upload.payload.items()}))
        return original(acc, upload)

    algo.accumulate = spy
    return seen


def spy_upload(algo):
    """Record the trained state each client hands to `upload`."""
    seen, original = {}, algo.upload

    def spy(cid, trained):
        seen[cid] = {k: v.clone() for k, v in trained.items()}
        return original(cid, trained)

    algo.upload = spy
    return seen


# -- FedAS ----------------------------------------------------------------------------------------

def test_fedas_without_alignment_and_with_sample_weights_is_fedper():
    config = small_config(algo="fedas", rounds=2, join_ratio=0.5)
    fedas = make_engine(config, align_epochs=0, weights="samples", eval="global")
    fedper = make_engine(config.replace(algo="fedper"))
    a, b = fedas.run(), fedper.run()
    assert metrics(a) == metrics(b)  # accuracies, losses and bytes, exactly
    assert states_equal(fedas.global_state, fedper.global_state)
    assert fedas.algo.kept.keys() == fedper.algo.kept.keys()
    assert all(states_equal(fedas.algo.kept[c], fedper.algo.kept[c]) for c in fedas.algo.kept)
    # each of the two changes alone departs from FedPer
    aligned = make_engine(config, weights="samples", eval="global")
    aligned.run()
    assert not states_equal(aligned.global_state, fedper.global_state)
    fisher = make_engine(config, align_epochs=0, eval="global")
    fisher.run()
    assert not states_equal(fisher.global_state, fedper.global_state)


def test_fedas_body_is_the_fisher_weighted_mean_with_normalized_weights():
    engine = make_engine(small_config(algo="fedas", rounds=1))
    algo = engine.algo
    uploads = spy_accumulate(algo)
    engine.run()
    assert [cid for cid, _, _ in uploads] == engine.schedule[0]
    traces = {cid: float(p[FISHER]) for cid, _, p in uploads}
    weights = algo.last_weights
    assert weights.keys() == traces.keys() and all(w > 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    total = sum(traces.values())
    assert all(weights[c] == pytest.approx(traces[c] / total, rel=1e-12) for c in traces)
    sizes = {cid: n for cid, n, _ in uploads}
    assert max(abs(weights[c] - sizes[c] / sum(sizes.values())) for c in sizes) > 0.01  # not sample counts
    for key in algo.body_keys:
        expected = sum(weights[c] * p[key].double() for c, _, p in uploads)
        torch.testing.assert_close(engine.global_state[key].double(), expected, rtol=1e-5, atol=1e-6)
    # the head is never sent, so never averaged
    assert all(set(p) == {*algo.body_keys, FISHER} for _, _, p in uploads)


def test_fedas_fisher_trace_matches_a_hand_computation():
    engine = make_engine(small_config(algo="fedas"), fisher="batch")
    model, trainer, algo = engine.model, engine.trainer, engine.algo
    x, y = trainer.data.x, trainer.data.y
    idx = engine.clients[0].train
    params = list(model.parameters())
    expected = 0.0
    for take in idx.split(engine.config.batch_size):  # sum over batches of |grad of the batch mean NLL|^2
        grads = torch.autograd.grad(F.cross_entropy(model(x[take]), y[take]), params)
        expected += sum(float(g.double().square().sum()) for g in grads)
    before = trainer.grad_evals
    assert algo.fisher_trace(0, model) == pytest.approx(expected, rel=1e-6)
    assert trainer.grad_evals - before == len(idx)
    algo.hp.fisher = "sample"  # mean over samples of |grad log p(y|x)|^2
    per_sample = 0.0
    for i in idx:
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        per_sample += sum(float(g.double().square().sum()) for g in grads)
    before = trainer.grad_evals
    assert algo.fisher_trace(0, model) == pytest.approx(per_sample / len(idx), rel=1e-5)
    assert trainer.grad_evals - before == len(idx)


def test_fedas_alignment_loss_matches_a_hand_computation():
    feats = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([0, 0, 2, 2])
    protos = torch.tensor([[1.0, 1.0], [9.0, 9.0], [0.0, 0.0]])  # class 1 absent from the batch
    # per class: the mean over its samples and coordinates of the squared error, summed
    class0 = ((0 + 1) + (4 + 1)) / 4
    class2 = ((0 + 1) + (4 + 4)) / 4
    assert float(alignment_loss(feats, y, protos, "sample")) == pytest.approx(class0 + class2)
    # per class: the squared error of the class mean, averaged over coordinates, summed
    mean0, mean2 = (2.0, 1.0), (1.0, 1.5)
    expected = ((mean0[0] - 1) ** 2 + (mean0[1] - 1) ** 2) / 2 + (mean2[0] ** 2 + mean2[1] ** 2) / 2
    assert float(alignment_loss(feats, y, protos, "mean")) == pytest.approx(expected)


def test_fedas_alignment_moves_only_the_body_towards_the_old_prototypes():
    engine = make_engine(small_config(algo="fedas", rounds=1))
    engine.run()
    algo, model = engine.algo, engine.model
    cid = engine.schedule[0][0]
    prototypes = algo.prototypes[cid]
    start = algo.client_start(cid, engine.global_state)
    set_state(model, start)
    data, idx = engine.trainer.data, engine.clients[cid].train

    def full_loss():
        with torch.no_grad():
            return float(alignment_loss(model.body(data.x[idx]), data.y[idx], prototypes, "sample"))

    before = full_loss()
    algo.align(cid, model, 2, prototypes)
    after = get_state(model)
    assert full_loss() < before
    assert states_equal(subset(after, algo.head_keys), subset(start, algo.head_keys))
    assert not states_equal(subset(after, algo.body_keys), subset(start, algo.body_keys))


def test_fedas_counts_alignment_training_and_fisher_exactly():
    config = small_config(algo="fedas", rounds=2, join_ratio=0.5, local_epochs=2)
    engine = make_engine(config)
    summary = engine.run().summary
    assert summary["grad_evals"] == (1 + 2 + 1) * samples_trained(engine)
    assert summary["eval_grad_evals"] == 0
    engine = make_engine(config, align_epochs=3, weights="samples")
    assert engine.run().summary["grad_evals"] == (3 + 2) * samples_trained(engine)


def test_fedas_sends_the_body_down_and_the_body_and_one_float_up():
    engine = make_engine(small_config(algo="fedas", rounds=2, join_ratio=0.5))
    result = engine.run()
    body = nbytes(subset(engine.global_state, engine.algo.body_keys))
    assert comm_bytes(result) == (2 * 3 * (body + 4), 2 * 3 * body)


def test_fedas_evaluates_the_last_trained_model_read_only():
    engine = make_engine(small_config(algo="fedas", rounds=1, join_ratio=0.5))
    initial = {k: v.clone() for k, v in engine.global_state.items()}
    algo = engine.algo
    trained = spy_upload(algo)
    engine.run()
    g = engine.global_state
    sampled = set(engine.schedule[0])
    assert trained.keys() == sampled
    def snapshot():
        kept = {f"{c}/{k}": v.clone() for c, s in algo.kept.items() for k, v in s.items()}
        bodies = {f"{c}/{k}": v.clone() for c, s in algo.bodies.items() for k, v in s.items()}
        return kept, bodies, {str(c): p.clone() for c, p in algo.prototypes.items()}

    before = snapshot()
    for cid in range(len(engine.clients)):
        expected = trained[cid] if cid in sampled else initial  # first=init: the initial model
        assert states_equal(algo.eval_state(cid, g), expected)
        model = algo.eval_model(cid, g)
        assert engine.trainer.evaluate(model, cid) == engine.trainer.evaluate(algo.eval_model(cid, g), cid)
    assert all(states_equal(x, y) for x, y in zip(before, snapshot()))
    # eval=global: the global body under the client's head
    algo.hp.eval = "global"
    cid = min(sampled)
    assert states_equal(algo.eval_state(cid, g), {**g, **subset(trained[cid], algo.head_keys)})


# -- FedPAC ---------------------------------------------------------------------------------------

def test_simplex_qp_matches_a_hand_solved_two_client_problem():
    # v = (1, 2), h_0 = 0, |h_1 - h_0|^2 = 1.  Client 0: P = diag(1, 2 + 1), so a = (3, 1) / 4;
    # client 1: P = diag(1 + 1, 2), so a = (1, 1) / 2.
    v = torch.tensor([1.0, 2.0])
    h = torch.zeros(2, 3, 4)
    h[1, 0, 0] = 1.0
    alpha = combination_weights(v, h, eps=1e-3)
    assert torch.allclose(alpha, torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64), atol=1e-6)


def test_qp_picks_the_client_whose_statistics_dominate():
    # identical class means (no bias) and one client with a tiny variance (much data): every
    # client puts all its weight on it (the others' weights fall under eps and are zeroed)
    v = torch.tensor([1.0, 1.0, 1e-4])
    h = torch.ones(3, 10, 8)
    alpha = combination_weights(v, h, eps=1e-3)
    assert torch.equal(alpha, torch.tensor([[0.0, 0.0, 1.0]] * 3, dtype=torch.float64))
    # a client far from the others in feature means keeps its own head
    h[0] += 5.0
    alpha = combination_weights(v, h, eps=1e-3)
    assert torch.equal(alpha[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_simplex_qp_is_optimal_on_the_simplex():
    gen = np.random.default_rng(0)
    for _ in range(5):
        a = gen.normal(size=(3, 6))
        P = a @ a.T + np.diag(gen.uniform(0.01, 1.0, 3))
        w = simplex_qp(P, 0, eps=0.0)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
        grid = [np.array([i, j, 100 - i - j]) / 100 for i, j in itertools.product(range(101), repeat=2) if i + j <= 100]
        assert w @ P @ w <= min(g @ P @ g for g in grid) + 1e-9


def test_fedpac_statistics_match_the_definition():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0] * 20 + [2] * 15 + [3] * 5)
    means, v, h = feature_statistics(feats, labels, num_classes=4)
    n, expected_v = len(labels), 0.0
    for k in range(4):
        z = feats[labels == k]
        if len(z) == 0:
            assert torch.equal(means[k], torch.zeros(5, dtype=torch.float64)) and torch.equal(h[k], means[k])
            continue
        p, mu = len(z) / n, z.mean(0)
        torch.testing.assert_close(means[k], mu)
        torch.testing.assert_close(h[k], p * mu)
        expected_v += p * float(torch.trace(z.t() @ z / len(z))) - p * p * float(mu @ mu)
    assert float(v) == pytest.approx(expected_v / n, rel=1e-12)


def test_fedpac_without_alignment_and_combination_is_fedrep():
    config = small_config(algo="fedpac", rounds=2, join_ratio=0.5, local_epochs=2)
    fedpac = make_engine(config, lam=0.0, combine=False, head_lr=-1.0)
    fedrep = make_engine(config.replace(algo="fedrep"), head_epochs=1, body_epochs=2)
    a, b = fedpac.run(), fedrep.run()
    assert metrics(a) == metrics(b)  # bytes included: nothing but the body travels
    assert states_equal(fedpac.global_state, fedrep.global_state)
    assert all(states_equal(fedpac.algo.kept[c], fedrep.algo.kept[c]) for c in fedrep.algo.kept)


def test_fedpac_alignment_starts_once_global_prototypes_exist():
    config = small_config(algo="fedpac", rounds=1, join_ratio=0.5)
    plain, aligned = make_engine(config, lam=0.0, combine=False), make_engine(config, lam=1.0, combine=False)
    plain.run(), aligned.run()
    assert states_equal(plain.global_state, aligned.global_state)  # round 1: no prototypes, plain CE
    config = config.replace(rounds=2)
    plain, aligned = make_engine(config, lam=0.0, combine=False), make_engine(config, lam=1.0, combine=False)
    plain.run(), aligned.run()
    assert not states_equal(plain.global_state, aligned.global_state)


def test_fedpac_heads_are_qp_combinations_and_prototypes_count_weighted_means():
    engine = make_engine(small_config(algo="fedpac", rounds=1))
    algo = engine.algo
    uploads = spy_accumulate(algo)
    engine.run()
    cids = [cid for cid, _, _ in uploads]
    payloads = {cid: p for cid, _, p in uploads}
    alpha = combination_weights(torch.stack([payloads[c][V] for c in cids]),
                                torch.stack([payloads[c][H] for c in cids]), algo.hp.eps)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(1), torch.ones(len(cids), dtype=torch.float64), rtol=0, atol=1e-12)
    assert any(alpha[i, i] < 1 for i in range(len(cids)))  # some head really is a combination
    for i, cid in enumerate(cids):
        assert algo.last_alpha[cid] == {c: float(alpha[i, j]) for j, c in enumerate(cids)}
        for key in algo.head_keys:
            expected = sum(float(alpha[i, j]) * payloads[c][key].double() for j, c in enumerate(cids))
            torch.testing.assert_close(algo.kept[cid][key].double(), expected, rtol=1e-5, atol=1e-6)
    counts = torch.stack([payloads[c][COUNTS].double() for c in cids])  # m x C
    protos = torch.stack([payloads[c][PROTOS].double() for c in cids])  # m x C x D
    mask = counts.sum(0) > 0
    expected = (counts[:, :, None] * protos).sum(0)[mask] / counts.sum(0)[mask][:, None]
    assert torch.equal(algo.proto_mask, mask)
    torch.testing.assert_close(algo.global_protos[mask].double(), expected, rtol=1e-5, atol=1e-6)


def test_fedpac_bytes_count_heads_statistics_and_prototypes():
    engine = make_engine(small_config(algo="fedpac", rounds=2, join_ratio=0.5))
    result = engine.run()
    algo, g = engine.algo, engine.global_state
    body, head = nbytes(subset(g, algo.body_keys)), nbytes(subset(g, algo.head_keys))
    c, d = engine.model.head.out_features, engine.model.head.in_features
    m = 3
    stats_up = c * d * 4 + 4 + c * d * 4 + c * 4  # h, v, prototypes, class counts
    up = 2 * m * (body + head + stats_up)
    # round 1: body, then the combined head; round 2: the global prototypes (and mask) too
    down = m * (body + head) + m * (body + c * d * 4 + c + head)
    assert comm_bytes(result) == (up, down)


def test_fedpac_counts_head_and_body_epochs_exactly():
    engine = make_engine(small_config(algo="fedpac", rounds=2, join_ratio=0.5, local_epochs=2))
    summary = engine.run().summary
    assert summary["grad_evals"] == (1 + 2) * samples_trained(engine)
    assert summary["eval_grad_evals"] == 0


# -- both -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["fedas", "fedpac"])
def test_same_config_gives_identical_runs(algo):
    config = small_config(algo=algo, rounds=2, join_ratio=0.5)
    a, b = make_engine(config).run(), make_engine(config).run()
    assert metrics(a) == metrics(b)
    assert a.summary["grad_evals"] == b.summary["grad_evals"]


@pytest.mark.parametrize("algo", ["fedas", "fedpac"])
@pytest.mark.parametrize("model", ["fedavgcnn", "lenet5"])
def test_conv_models_feature_sizes_are_read_from_the_model(algo, model):
    """Digits upsampled to 16x16 so the conv nets fit; prototypes have the head's input width."""
    upsampled = digits16()
    engine = make_engine(small_config(algo=algo, model=model, rounds=1, clients=4, join_ratio=0.5), data=upsampled)
    result = engine.run()
    assert all(np.isfinite(r["acc"]) and np.isfinite(r["loss"]) for r in result.rounds)
    width = engine.model.head.in_features
    if algo == "fedas":
        assert all(p.shape == (10, width) for p in engine.algo.prototypes.values())
    else:
        assert engine.algo.global_protos.shape == (10, width)


@pytest.mark.parametrize("algo, overrides, message", [
    ("fedas", {"align_epochs": -1}, "align_epochs must be >= 0"),
    ("fedas", {"align_lr": 0.0}, "align_lr must be > 0"),
    ("fedas", {"weights": "uniform"}, "weights takes one of fisher, samples"),
    ("fedas", {"eval": "x"}, "eval takes one of local, global"),
    ("fedpac", {"lam": -0.5}, "lam must be >= 0"),
    ("fedpac", {"head_lr": 0.0}, "head_lr must be > 0, or -1"),
    ("fedpac", {"body_epochs": -2}, "body_epochs must be >= 0, or -1"),
    ("fedpac", {"eps": 1.0}, "eps must be in [0, 1)"),
    ("fedpac", {"combine": "maybe"}, "combine takes true or false"),
])
def test_bad_hyperparameters_are_one_line_errors(algo, overrides, message):
    with pytest.raises(UserError) as err:
        resolve_hyperparams(get_algorithm(algo), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)

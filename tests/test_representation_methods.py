"""Representation-level methods: MOON (a model-contrastive term on the body's features) and FedProto
(class prototypes instead of models), each checked on the exact property that defines it, its
exact communication bytes, its compute count and determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import comm_bytes, make_engine, metrics, small_config, states_equal
from pflbench.core.data import Dataset
from pflbench.core.registry import get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.core.state import nbytes, set_state
from pflbench.errors import UserError

load_algorithms()


def twice_sampled(engine):
    """Clients sampled in more than one round (they train against a previous model)."""
    seen, again = set(), set()
    for sampled in engine.schedule:
        again |= seen & set(sampled)
        seen |= set(sampled)
    return again


def classes_of(engine, cid):
    return int((engine.algo.ctx.label_counts(cid) > 0).sum())


# == MOON ===========================================================================================

def test_moon_with_mu0_is_exactly_fedavg_although_the_term_is_computed():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    engine = make_engine(config.replace(algo="moon"), mu=0.0)
    with_term = []
    original = engine.algo.local_loss
    engine.algo.local_loss = lambda received, previous: (with_term.append(previous is not None),
                                                         original(received, previous))[1]
    moon = engine.run()
    assert any(with_term)  # clients sampled again trained with the contrastive term, times 0
    assert metrics(moon) == metrics(fedavg)  # same batches, same bytes, exact zeros added
    assert moon.summary["grad_evals"] == fedavg.summary["grad_evals"]


def test_moon_with_mu_positive_differs_from_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg"))
    fedavg.run()
    moon = make_engine(config.replace(algo="moon"), mu=5.0)
    moon.run()
    assert not states_equal(moon.global_state, fedavg.global_state)


def test_moon_contrastive_term_is_the_papers_two_way_softmax_and_inert_when_negative_is_positive():
    engine = make_engine(small_config(algo="moon"), mu=2.0, tau=0.5)
    algo, model = engine.algo, engine.model
    received = {k: v.clone() for k, v in engine.global_state.items()}
    gen = torch.Generator().manual_seed(3)
    previous = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in received.items()}
    current = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in received.items()}
    x, y = next(iter(engine.trainer.batches(0, 1, 1)))

    def body_out(state):
        set_state(model, state)
        with torch.no_grad():
            return model.body(x)

    z, z_glob, z_prev = body_out(current), body_out(received), body_out(previous)
    pos = F.cosine_similarity(z, z_glob) / 0.5
    neg = F.cosine_similarity(z, z_prev) / 0.5
    term = -torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(neg))).mean()
    set_state(model, current)
    expected = F.cross_entropy(model(x), y) + 2.0 * term
    assert algo.local_loss(received, previous)(model, x, y).item() == pytest.approx(expected.item(), rel=1e-5)

    # negative == positive (FL-bench's first participation): the term is log 2 and has no gradient
    model.zero_grad()
    algo.local_loss(received, received)(model, x, y).backward()
    with_inert = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    algo.local_loss(received, None)(model, x, y).backward()
    for a, b in zip(with_inert, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_moon_contrasts_with_the_clients_last_trained_model_and_keeps_it():
    engine = make_engine(small_config(algo="moon", join_ratio=0.5, rounds=4))
    algo = engine.algo
    assert twice_sampled(engine)
    events = []  # ("train", cid, negative) and ("upload", cid, trained), in the order they happen
    client_start, local_loss, upload = algo.client_start, algo.local_loss, algo.upload
    current = {}

    def spy_start(cid, g):
        current["cid"] = cid
        return client_start(cid, g)

    def spy_loss(received, previous):
        events.append(("train", current["cid"], None if previous is None else
                       {k: v.clone() for k, v in previous.items()}))
        return local_loss(received, previous)

    def spy_upload(cid, trained):
        events.append(("upload", cid, {k: v.clone() for k, v in trained.items()}))
        return upload(cid, trained)

    algo.client_start, algo.local_loss, algo.upload = spy_start, spy_loss, spy_upload
    engine.run()
    last = {}
    for kind, cid, state in events:
        if kind == "train":
            expected = last.get(cid)
            assert (state is None) if expected is None else states_equal(state, expected)
        else:
            last[cid] = state
    assert sum(kind == "train" and state is not None for kind, _, state in events) > 0
    assert algo.previous.keys() == last.keys()
    assert all(states_equal(algo.previous[cid], last[cid]) for cid in last)  # kept: the last trained


def test_moon_first_init_uses_the_initial_model_for_a_first_participation():
    engine = make_engine(small_config(algo="moon", join_ratio=0.5, rounds=2), first="init")
    initial = {k: v.clone() for k, v in engine.global_state.items()}
    algo, seen = engine.algo, []
    local_loss = algo.local_loss
    algo.local_loss = lambda received, previous: (seen.append(previous), local_loss(received, previous))[1]
    engine.run()
    assert len(seen) == 6 and all(p is not None for p in seen)
    first_round = seen[:3]
    assert all(states_equal(p, initial) for p in first_round)


def test_moon_sends_exactly_fedavgs_bytes_and_counts_fedavgs_compute():
    config = small_config(join_ratio=0.5, rounds=3, local_epochs=2)
    fedavg_engine = make_engine(config.replace(algo="fedavg"))
    fedavg = fedavg_engine.run()
    engine = make_engine(config.replace(algo="moon"))
    moon = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(moon) == comm_bytes(fedavg) == (3 * 3 * full, 3 * 3 * full)
    trained = sum(engine.clients[c].n_train for sampled in engine.schedule for c in sampled)
    assert moon.summary["grad_evals"] == fedavg.summary["grad_evals"] == 2 * trained
    assert moon.summary["eval_adapt"] == "none"
    g = engine.global_state  # not personalized: every client is tested with the global model
    assert all(states_equal(engine.algo.eval_state(cid, g), g) for cid in range(6))


def test_moon_projection_head_is_the_papers_and_travels_with_the_model():
    engine = make_engine(small_config(algo="moon", join_ratio=0.5, rounds=2), proj_dim=16)
    head = engine.model.head
    assert head.project[0].weight.shape == (200, 200) and head.project[2].weight.shape == (16, 200)
    assert head.out.weight.shape == (10, 16)
    x = engine.trainer.data.x[:5]
    z, logits = engine.algo.representation(engine.model, x)
    assert z.shape == (5, 16) and torch.equal(logits, engine.model(x))
    result = engine.run()
    full = nbytes(engine.global_state)
    assert full == 4 * sum(p.numel() for p in engine.model.parameters())
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert all(math.isfinite(r["acc"]) for r in result.rounds)


def test_moon_projection_head_is_seeded_without_the_global_rng():
    config = small_config(algo="moon")
    make_engine(config.replace(algo="fedavg"))
    after_fedavg = torch.random.get_rng_state()
    a = make_engine(config, proj_dim=8)
    after_moon = torch.random.get_rng_state()
    b = make_engine(config, proj_dim=8)
    assert torch.equal(after_fedavg, after_moon)  # the head's init drew from its own generator
    assert states_equal(a.global_state, b.global_state)


def test_moon_is_deterministic():
    config = small_config(algo="moon", join_ratio=0.5, rounds=3)
    a, b = make_engine(config), make_engine(config)
    assert metrics(a.run()) == metrics(b.run())
    assert states_equal(a.global_state, b.global_state)


# == FedProto =======================================================================================

@pytest.mark.parametrize("protos", ["final", "train"])
def test_fedproto_with_lam0_and_model_eval_is_exactly_local(protos):
    config = small_config(join_ratio=0.5, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    engine = make_engine(config.replace(algo="fedproto"), lam=0.0, protos=protos)
    fedproto = engine.run()
    assert engine.algo.present.all()  # the prototype term was there, times 0
    assert metrics(fedproto, with_comm=False) == metrics(local, with_comm=False)


def test_fedproto_with_lam_positive_differs_from_local():
    config = small_config(join_ratio=0.5, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    fedproto = make_engine(config.replace(algo="fedproto"), lam=1.0).run()
    assert metrics(fedproto, with_comm=False)[1] != metrics(local, with_comm=False)[1]


def hand_uploads(algo, d):
    """Three clients' prototypes in d dimensions with small integer values (exact arithmetic)."""
    from pflbench.core.algorithm import Upload

    def up(cid, classes, counts, rows):
        return Upload(cid, sum(counts), {"proto.means": torch.tensor(rows, dtype=torch.float32),
                                         "proto.classes": torch.tensor(classes),
                                         "proto.counts": torch.tensor(counts)})

    return [up(0, [0, 2], [1, 3], [[1.0] * d, [4.0] * d]),
            up(1, [2], [1], [[8.0] * d]),
            up(2, [0, 2], [3, 4], [[5.0] * d, [0.0] * d])]


@pytest.mark.parametrize("weights, expected0, expected2", [
    # clients: each client that sent the class counts 1 / (number of such clients)
    ("clients", (1 + 5) / 2, (4 + 8 + 0) / 3),
    # samples: a client counts its share of the class's samples (1 and 3 of 4; 3, 1, 4 of 8)
    ("samples", (1 * 1 + 3 * 5) / 4, (3 * 4 + 1 * 8 + 4 * 0) / 8),
])
def test_fedproto_server_averages_each_class_over_the_clients_that_sent_it(weights, expected0, expected2):
    engine = make_engine(small_config(algo="fedproto"), weights=weights)
    algo, d = engine.algo, engine.algo.dim
    uploads = hand_uploads(algo, d)
    out = algo.aggregate(uploads, engine.global_state)
    assert states_equal(out, engine.global_state)  # no model is averaged
    assert algo.present.tolist() == [True, False, True] + [False] * 7
    assert torch.equal(algo.prototypes[0], torch.full((d,), expected0))
    assert torch.equal(algo.prototypes[2], torch.full((d,), expected2))
    # the weights of a class sum to 1: identical prototypes average to themselves exactly
    same = [type(u)(u.cid, u.n_train, {**u.payload, "proto.means": torch.full_like(u.payload["proto.means"], 0.3)})
            for u in uploads]
    algo.aggregate(same, engine.global_state)
    assert torch.equal(algo.prototypes[[0, 2]], torch.full((2, d), 0.3))


@pytest.mark.parametrize("absent, kept", [("keep", True), ("drop", False)])
def test_fedproto_a_class_nobody_sent_is_kept_or_dropped(absent, kept):
    engine = make_engine(small_config(algo="fedproto"), absent=absent)
    algo, d = engine.algo, engine.algo.dim
    uploads = hand_uploads(algo, d)
    algo.aggregate(uploads, engine.global_state)
    algo.aggregate([uploads[1]], engine.global_state)  # only class 2 this time
    assert torch.equal(algo.prototypes[2], torch.full((d,), 8.0))
    assert bool(algo.present[0]) is kept
    if kept:
        assert torch.equal(algo.prototypes[0], torch.full((d,), 3.0))


def test_fedproto_uploads_the_class_means_of_the_trained_body_and_keeps_the_model():
    engine = make_engine(small_config(algo="fedproto", join_ratio=0.5, rounds=2))
    algo, data, seen = engine.algo, engine.trainer.data, []
    upload = algo.upload

    def spy(cid, trained):
        payload = upload(cid, trained)
        seen.append((cid, {k: v.clone() for k, v in trained.items()}, payload))
        return payload

    algo.upload = spy
    engine.run()
    assert len(seen) == 6
    for cid, trained, payload in seen:
        assert set(payload) == {"proto.means", "proto.classes", "proto.counts"}  # no model tensor
        set_state(engine.model, trained)
        idx = engine.clients[cid].train
        with torch.no_grad():
            z = engine.model.body(data.x[idx])
        y = data.y[idx]
        classes = torch.unique(y)
        assert torch.equal(payload["proto.classes"], classes)
        assert torch.equal(payload["proto.counts"], torch.stack([(y == c).sum() for c in classes]))
        means = torch.stack([z[y == c].mean(0) for c in classes])
        torch.testing.assert_close(payload["proto.means"], means, rtol=1e-5, atol=1e-6)
    last = {cid: trained for cid, trained, _ in seen}
    for cid, trained in last.items():
        assert states_equal(algo.kept[cid], trained)  # the whole model stays on the client


@pytest.mark.parametrize("absent", ["keep", "drop"])
def test_fedproto_counts_exactly_the_prototypes_sent(absent):
    engine = make_engine(small_config(algo="fedproto", join_ratio=0.5, rounds=3), absent=absent)
    result = engine.run()
    d = engine.model.head.in_features
    up = sum(classes_of(engine, c) * (4 * d + 16) for sampled in engine.schedule for c in sampled)
    down, have = 0, set()
    for sampled in engine.schedule:
        down += len(sampled) * len(have) * (4 * d + 8)  # the prototypes that exist when it starts
        sent = {int(k) for c in sampled for k in torch.nonzero(engine.algo.ctx.label_counts(c)).flatten()}
        have = have | sent if absent == "keep" else sent
    assert comm_bytes(result) == (up, down)
    assert down > 0 and up < nbytes(engine.global_state)  # far less than one model per round


def test_fedproto_loss_is_cross_entropy_plus_lam_times_the_masked_prototype_mse():
    engine = make_engine(small_config(algo="fedproto"), lam=0.7)
    algo, model = engine.algo, engine.model
    d = algo.dim
    gen = torch.Generator().manual_seed(0)
    algo.prototypes.copy_(torch.randn(10, d, generator=gen))
    algo.present.copy_(torch.arange(10) % 2 == 0)  # odd classes have no global prototype
    x, y = next(iter(engine.trainer.batches(0, 1, 1)))
    assert (y % 2 == 1).any() and (y % 2 == 0).any()
    with torch.no_grad():
        z = model.body(x)
        rows = [(z[b] - algo.prototypes[y[b]]).square().sum() for b in range(len(y)) if y[b] % 2 == 0]
        expected = F.cross_entropy(model(x), y) + 0.7 * torch.stack(rows).sum() / (len(y) * d)
        got = algo.local_loss(None, None)(model, x, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_fedproto_prototype_eval_predicts_the_nearest_global_prototype_read_only():
    engine = make_engine(small_config(algo="fedproto", join_ratio=0.5, rounds=2), eval="prototype")
    result = engine.run()
    algo, data = engine.algo, engine.trainer.data
    assert result.summary["eval_adapt"].startswith("nearest global prototype")
    algo.present[3] = False  # a class without a global prototype is never predicted
    protos, present = algo.prototypes.clone(), algo.present.clone()
    kept = {c: {k: v.clone() for k, v in s.items()} for c, s in algo.kept.items()}
    for cid in range(6):
        idx = engine.clients[cid].test
        with torch.no_grad():
            scores = algo.eval_model(cid, engine.global_state)(data.x[idx])
            again = algo.eval_model(cid, engine.global_state)(data.x[idx])
            set_state(engine.model, algo.eval_state(cid, engine.global_state))
            z = engine.model.body(data.x[idx])
        dist = torch.cdist(z, protos).square()
        dist[:, ~present] = float("inf")
        assert torch.equal(scores.argmax(1), dist.argmin(1))
        assert torch.equal(scores, again) and torch.isfinite(scores).all()
        assert not (scores.argmax(1) == 3).any()
    assert torch.equal(algo.prototypes, protos) and torch.equal(algo.present, present)
    assert all(states_equal(algo.kept[c], s) for c, s in kept.items())


def test_fedproto_is_deterministic_and_declares_its_evaluation():
    config = small_config(algo="fedproto", join_ratio=0.5, rounds=3)
    a, b = make_engine(config, eval="prototype"), make_engine(config, eval="prototype")
    assert metrics(a.run()) == metrics(b.run())
    assert torch.equal(a.algo.prototypes, b.algo.prototypes)
    cls = get_algorithm("fedproto")
    assert cls.describe_eval_adaptation(cls.Hyperparams()) == "none"


# == both ===========================================================================================

def test_both_read_the_feature_size_from_conv_models():
    gen = torch.Generator().manual_seed(0)
    data = Dataset("synth", torch.rand(160, 1, 28, 28, generator=gen), torch.arange(160) % 4, 4)
    for model in ("lenet5", "fedavgcnn"):
        for algo, hp in (("moon", {"proj_dim": 8}), ("fedproto", {"eval": "prototype"})):
            config = small_config(algo=algo, model=model, clients=2, rounds=2, dataset="synth")
            engine = make_engine(config, data=data, **hp)
            result = engine.run()
            assert all(math.isfinite(r["acc"]) for r in result.rounds)
            if algo == "fedproto":
                d = {"lenet5": 84, "fedavgcnn": 512}[model]
                assert engine.algo.prototypes.shape == (4, d)


@pytest.mark.parametrize("algo, overrides, message", [
    ("moon", {"mu": -1.0}, "mu must be a finite number >= 0 (got -1.0)"),
    ("moon", {"tau": 0.0}, "tau must be a finite number > 0 (got 0.0)"),
    ("moon", {"proj_dim": -2}, "proj_dim must be >= 0"),
    ("moon", {"first": "random"}, "first takes one of global, init"),
    ("fedproto", {"lam": -0.5}, "lam must be a finite number >= 0 (got -0.5)"),
    ("fedproto", {"lam": float("nan")}, "lam must be a finite number >= 0"),
    ("fedproto", {"eval": "ensemble"}, "eval takes one of model, prototype"),
    ("fedproto", {"weights": "equal"}, "weights takes one of clients, samples"),
])
def test_bad_hyperparameters_are_one_line_user_errors(algo, overrides, message):
    with pytest.raises(UserError) as err:
        resolve_hyperparams(get_algorithm(algo), {k: str(v) if isinstance(v, str) else v for k, v in overrides.items()})
    assert message in str(err.value) and "\n" not in str(err.value)

"""Hypernetworks on the server (pFedHN, pFedLA): the server step is the vector-Jacobian product of
the client's update, checked by hand; pFedLA's weights are a distribution per layer and client;
boundary settings; exact bytes; read-only evaluation; determinism; bad hyperparameters."""

import pytest
import torch

from helpers import comm_bytes, finite_accuracy, make_engine, metrics, small_config, states_equal
from pflbench.core.algorithm import Upload
from pflbench.core.registry import get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.core.state import get_state, nbytes, subset
from pflbench.errors import UserError


def one_upload(engine, cid, seed=0, scale=0.01):
    """One client's round by hand on the server side: start, a trained model (the start plus a
    seeded perturbation), upload, accumulate, finish. Returns (start, uploaded delta)."""
    algo, g = engine.algo, engine.global_state
    gen = torch.Generator().manual_seed(seed)
    algo.begin_round(1, [cid])
    start = algo.client_start(cid, g)
    trained = {k: t + scale * torch.randn(t.shape, generator=gen) for k, t in start.items()}
    payload = algo.upload(cid, trained)
    n = engine.clients[cid].n_train
    acc = algo.begin_aggregation(g, {cid: n})
    algo.accumulate(acc, Upload(cid, n, payload))
    algo.finish_aggregation(acc, g)
    return start, payload


def inner(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in b)


def spy_starts_and_trained(algo):
    """Record (cid, start state) at every client_start and (cid, trained state) after training."""
    starts, trained = [], []
    client_start, local_train = algo.client_start, algo.local_train

    def start_spy(cid, global_state):
        state = client_start(cid, global_state)
        starts.append((cid, {k: t.clone() for k, t in state.items()}))
        return state

    def train_spy(cid, model, round_):
        stats = local_train(cid, model, round_)
        trained.append((cid, get_state(model)))
        return stats

    algo.client_start, algo.local_train = start_spy, train_spy
    return starts, trained


# -- pFedHN ----------------------------------------------------------------------------------------

def test_pfedhn_step_is_the_vector_jacobian_product_checked_by_hand():
    # per-tensor heads theta_k = W_k f + b_k: the product with -delta is -delta_k f^T for W_k and
    # -delta_k for b_k; the first step of SGD with momentum is lr * (gradient + wd * p)
    engine = make_engine(small_config(algo="pfedhn"), norm_clip=0.0)
    algo, hn = engine.algo, engine.algo.hn
    before = {n: p.detach().clone() for n, p in hn.named_parameters()}
    features = hn.features(2).detach()
    start, delta = one_upload(engine, 2)
    lr, wd = algo.hp.hn_lr, algo.hp.hn_weight_decay
    assert states_equal(start, algo.generate(2, before)) and set(delta) == set(algo.all_keys)
    for i, key in enumerate(hn.keys):
        d = delta[key].reshape(-1)
        w, b = before[f"heads.{i}.weight"], before[f"heads.{i}.bias"]
        torch.testing.assert_close(hn.heads[i].weight.detach(), w - lr * (torch.outer(-d, features) + wd * w))
        torch.testing.assert_close(hn.heads[i].bias.detach(), b - lr * (-d + wd * b))
    others = [c for c in range(6) if c != 2]
    embeddings = before["embeddings"]
    torch.testing.assert_close(hn.embeddings.detach()[others], embeddings[others] * (1 - lr * wd))
    assert not torch.allclose(hn.embeddings.detach()[2], embeddings[2] * (1 - lr * wd))
    # descent along the product moves the generated model towards the trained one
    moved = {k: algo.generate(2)[k] - start[k] for k in delta}
    assert inner(moved, delta) > 0


def test_pfedhn_clips_the_step_to_norm_clip():
    # without momentum and weight decay the step is -hn_lr * the clipped product
    engine = make_engine(small_config(algo="pfedhn"), hn_lr=1.0, embed_lr=1.0, norm_clip=1.0,
                         hn_momentum=0.0, hn_weight_decay=0.0)
    algo, hn = engine.algo, engine.algo.hn
    before = {n: p.detach().clone() for n, p in hn.named_parameters()}
    _, delta = one_upload(engine, 0, scale=0.1)
    grads = algo.hypergradient(0, delta, before)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 10.0  # the clip binds
    step = torch.cat([(before[n] - p.detach()).reshape(-1) for n, p in hn.named_parameters()])
    direction = torch.cat([g.reshape(-1) for g in grads])
    assert step.norm().item() == pytest.approx(1.0, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(step, direction, dim=0) > 0.9999


def test_pfedhn_with_zero_server_lr_never_changes_the_generated_models():
    engine = make_engine(small_config(algo="pfedhn", rounds=2, join_ratio=0.5), hn_lr=0.0, embed_lr=0.0)
    algo, g = engine.algo, engine.global_state
    generated = {cid: algo.generate(cid) for cid in range(6)}
    starts, trained = spy_starts_and_trained(algo)
    engine.run()
    assert len(starts) == 6
    for (cid, start), (_, done) in zip(starts, trained):
        assert states_equal(start, generated[cid])
        assert not states_equal(done, start)  # the client did train; the server just never moves
    assert all(states_equal(algo.eval_state(cid, g), generated[cid]) for cid in range(6))


def test_pfedhn_client_and_round_steps_coincide_with_one_client_per_round():
    config = small_config(algo="pfedhn", rounds=3, join_ratio=1 / 6)
    assert config.clients_per_round == 1
    per_client = make_engine(config, server_step="client")
    per_round = make_engine(config, server_step="round")
    assert metrics(per_client.run()) == metrics(per_round.run())
    assert all(torch.equal(a, b) for a, b in zip(per_client.algo.hn.parameters(), per_round.algo.hn.parameters()))


def test_pfedhn_clients_of_a_round_start_from_the_rounds_hypernetwork():
    # the steps of earlier uploads go to the live hypernetwork, not to what later clients receive
    engine = make_engine(small_config(algo="pfedhn", rounds=1, join_ratio=0.5))
    algo = engine.algo
    generated = {cid: algo.generate(cid) for cid in range(6)}
    starts, _ = spy_starts_and_trained(algo)
    engine.run()
    assert len(starts) == 3 and all(states_equal(s, generated[cid]) for cid, s in starts)
    assert not any(states_equal(algo.generate(cid), generated[cid]) for cid, _ in starts)


def test_pfedhn_sends_the_generated_model_down_and_its_delta_up():
    engine = make_engine(small_config(algo="pfedhn", rounds=2, join_ratio=0.5))
    algo = engine.algo
    starts, trained = spy_starts_and_trained(algo)
    payloads = []
    upload = algo.upload
    algo.upload = lambda cid, state: payloads.append(upload(cid, state)) or payloads[-1]
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    for (_, start), (_, done), payload in zip(starts, trained, payloads):
        assert states_equal(payload, {k: done[k] - start[k] for k in algo.all_keys})
    assert finite_accuracy(result)


def test_pfedhn_pc_keeps_the_head_on_the_client_and_generates_the_body():
    engine = make_engine(small_config(algo="pfedhn", rounds=2, join_ratio=0.5), personal_head=True)
    algo, g = engine.algo, engine.global_state
    assert algo.download_keys(0) == algo.body_keys and algo.hn.keys == list(algo.body_keys)
    _, trained = spy_starts_and_trained(algo)
    result = engine.run()
    body = nbytes(subset(g, algo.body_keys))
    assert comm_bytes(result) == (2 * 3 * body, 2 * 3 * body)
    last = {cid: state for cid, state in trained}
    assert set(algo.kept) == set(last)
    for cid in range(6):
        state = algo.eval_state(cid, g)
        head = last[cid] if cid in last else algo.initial_local
        assert states_equal(subset(state, algo.head_keys), subset(head, algo.head_keys))
        assert states_equal(subset(state, algo.body_keys), algo.generate(cid))


def test_pfedhn_chunked_hypernetwork_generates_every_tensor_with_fewer_parameters():
    config = small_config(algo="pfedhn", rounds=2, join_ratio=0.5)
    chunked = make_engine(config, chunk_size=1000)
    hn, shapes = chunked.algo.hn, {k: t.shape for k, t in chunked.global_state.items()}
    out = chunked.algo.generate(3)
    assert {k: t.shape for k, t in out.items()} == shapes
    total, e, h = sum(t.numel() for t in chunked.global_state.values()), 2, 100  # embed 1 + 6/4
    chunks = -(-total // 1000)
    expected = 6 * e + chunks * e + (2 * e * h + h) + 3 * (h * h + h) + (h * 1000 + 1000)
    assert sum(p.numel() for p in hn.parameters()) == expected
    per_tensor = make_engine(config).algo.hn
    assert expected < sum(p.numel() for p in per_tensor.parameters()) / 10
    result = chunked.run()
    assert finite_accuracy(result) and result.summary["pfedhn_hn_params"] == expected


def test_pfedhn_inner_steps_train_that_many_batches():
    engine = make_engine(small_config(algo="pfedhn", rounds=2, join_ratio=0.5), inner_steps=3)
    assert all(c.n_train >= 3 * 16 for c in engine.clients)
    summary = engine.run().summary
    assert summary["grad_evals"] == 2 * 3 * (3 * 16)


def test_pfedhn_evaluation_is_read_only():
    engine = make_engine(small_config(algo="pfedhn", rounds=1, join_ratio=0.5))
    engine.run()
    params = [p.detach().clone() for p in engine.algo.hn.parameters()]
    first = engine.evaluate(2)
    assert engine.evaluate(2) == first
    assert all(torch.equal(a, b) for a, b in zip(params, engine.algo.hn.parameters()))


def test_pfedhn_newcomer_learns_only_its_own_embedding():
    """A holdout client starts from the members' mean embedding and trains it alone: with 0
    epochs it is tested with the model that mean generates; with 1 the hypernetwork and every
    member's embedding stay as they were, the work is one epoch of its samples, and the evaluation
    is repeatable."""
    engine = make_engine(small_config(algo="pfedhn", clients=6, holdout_clients=0.34, rounds=1), newcomer_epochs=0)
    engine.run()
    algo, cid = engine.algo, engine.holdout[0]
    members = list(engine.algo.ctx.participants)
    with torch.no_grad():
        mean = algo.hn.generate_from(algo.hn.features_of(algo.hn.embeddings[members].mean(0)))
    state = get_state(algo.newcomer_model(cid, engine.global_state))
    assert all(torch.allclose(state[k], mean[k]) for k in mean)

    engine = make_engine(small_config(algo="pfedhn", clients=6, holdout_clients=0.34, rounds=1), newcomer_epochs=1)
    engine.run()
    algo = engine.algo
    params = [p.detach().clone() for p in algo.hn.parameters()]
    before = engine.trainer.grad_evals
    rows = engine.evaluate(2)
    assert engine.trainer.grad_evals - before == sum(engine.clients[c].n_train for c in engine.holdout)
    assert all(torch.equal(a, b) for a, b in zip(params, algo.hn.parameters()))
    assert all(p.grad is None for p in algo.hn.parameters())
    assert engine.evaluate(2) == rows
    generated = get_state(algo.newcomer_model(engine.holdout[0], engine.global_state))
    assert not all(torch.allclose(generated[k], mean[k]) for k in mean)  # it moved away from the mean


# -- pFedLA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["relu", "softmax"])
@pytest.mark.parametrize("granularity, layers", [("layer", 3), ("tensor", 6)])
def test_pfedla_weights_are_a_distribution_over_clients_per_layer(normalize, granularity, layers):
    engine = make_engine(small_config(algo="pfedla", rounds=2, join_ratio=0.5), normalize=normalize,
                         granularity=granularity, hn_lr=0.5)
    algo = engine.algo
    initial = [algo.alphas(cid) for cid in range(6)]
    engine.run()
    for cid in range(6):
        a = algo.alphas(cid)
        assert a.shape == (layers, 6)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(1), torch.ones(layers), rtol=0, atol=1e-6)
    assert any(not torch.equal(algo.alphas(c), initial[c]) for c in range(6))  # the hypernetworks learned


def test_pfedla_row_that_sums_to_zero_takes_the_clients_own_layer():
    engine = make_engine(small_config(algo="pfedla"))
    algo = engine.algo
    algo.hn["out.bias"][4, 1] = -1e6  # layer 1 of client 4: every output negative, zero after ReLU
    a = algo.alphas(4)
    assert torch.equal(a[1], torch.nn.functional.one_hot(torch.tensor(4), 6).float())
    torch.testing.assert_close(a.sum(1), torch.ones(3))


def test_pfedla_start_is_the_layerwise_mix_of_the_stored_models():
    engine = make_engine(small_config(algo="pfedla", rounds=2))
    engine.run()
    algo, g = engine.algo, engine.global_state
    for cid in (0, 5):
        a = algo.alphas(cid)
        start = algo.client_start(cid, g)
        algo.received = None
        for layer, keys in enumerate(algo.groups):
            for k in keys:
                by_hand = sum(a[layer, j] * algo.models[k][j] for j in range(6))
                torch.testing.assert_close(start[k], by_hand)


def test_pfedla_hypernetwork_step_checked_by_hand():
    # alpha = r / sum(r), r = relu(z): d<theta_bar, -delta>/dz_m = (G_m - <alpha, G>) / sum(r) on
    # z_m > 0, G_j = <theta_j, -delta> per layer; that is the output bias's gradient
    engine = make_engine(small_config(algo="pfedla", rounds=1, join_ratio=0.5), hn_lr=0.01)
    engine.run()  # three clients' models now differ from the initial one
    algo, cid, lr = engine.algo, 1, 0.01
    params = {n: t.clone() for n, t in algo.hypernetwork(cid).items()}
    models = {k: m.clone() for k, m in algo.models.items()}
    h = params["embedding"]
    for i in range(3):
        h = torch.relu(params[f"mlp.{i}.weight"] @ h + params[f"mlp.{i}.bias"])
    z = params["out.weight"] @ h + params["out.bias"]
    r = torch.relu(z)
    alpha = r / r.sum(1, keepdim=True)
    start, delta = one_upload(engine, cid)
    grad_alpha = torch.zeros_like(alpha)
    for layer, keys in enumerate(algo.groups):
        for k in keys:
            for j in range(6):
                grad_alpha[layer, j] -= (models[k][j] * delta[k]).sum()
    grad_z = (grad_alpha - (alpha * grad_alpha).sum(1, keepdim=True)) / r.sum(1, keepdim=True) * (z > 0)
    torch.testing.assert_close(algo.hn["out.bias"][cid], params["out.bias"] - lr * grad_z)
    torch.testing.assert_close(algo.hn["out.weight"][cid], params["out.weight"] - lr * grad_z[..., None] * h)
    # descent along the product moves the client's aggregate towards its trained model
    new_alpha = algo.alphas(cid)
    moved = {k: torch.tensordot(new_alpha[algo.layer_of[k]], models[k], dims=1) - start[k] for k in delta}
    assert inner(moved, delta) > 0


def test_pfedla_only_the_uploading_clients_hypernetwork_moves():
    engine = make_engine(small_config(algo="pfedla"))
    algo = engine.algo
    before = {n: t.clone() for n, t in algo.hn.items()}
    one_upload(engine, 3)
    others = [c for c in range(6) if c != 3]
    assert all(torch.equal(t[others], before[name][others]) for name, t in algo.hn.items())
    assert any(not torch.equal(algo.hn[n][3], before[n][3]) for n in algo.hn)


def test_pfedla_stores_the_trained_models_at_the_end_of_the_round():
    engine = make_engine(small_config(algo="pfedla", rounds=1, join_ratio=0.5))
    algo = engine.algo
    initial = {k: m.clone() for k, m in algo.models.items()}
    seen = []
    client_start = algo.client_start
    algo.client_start = lambda cid, g: seen.append(states_equal(algo.models, initial)) or client_start(cid, g)
    _, trained = spy_starts_and_trained(algo)
    engine.run()
    assert seen == [True, True, True]  # no client of the round saw another's new model
    done = {cid: state for cid, state in trained}
    for cid in range(6):
        for k in algo.all_keys:
            expected = done[cid][k] if cid in done else initial[k][cid]
            torch.testing.assert_close(algo.models[k][cid], expected, rtol=0, atol=1e-6)


def test_pfedla_with_zero_hn_lr_keeps_its_weights():
    engine = make_engine(small_config(algo="pfedla", rounds=2, join_ratio=0.5), hn_lr=0.0)
    algo = engine.algo
    initial = [algo.alphas(cid) for cid in range(6)]
    engine.run()
    assert all(torch.equal(algo.alphas(cid), initial[cid]) for cid in range(6))


def test_pfedla_sends_the_model_both_ways():
    engine = make_engine(small_config(algo="pfedla", rounds=2, join_ratio=0.5))
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert finite_accuracy(result) and 0 < result.summary["pfedla_self_weight"] < 1


@pytest.mark.parametrize("mode", ["aggregate", "local"])
def test_pfedla_evaluation_is_read_only(mode):
    engine = make_engine(small_config(algo="pfedla", rounds=1, join_ratio=0.5), eval=mode)
    engine.run()
    algo, g = engine.algo, engine.global_state
    hn = {n: t.clone() for n, t in algo.hn.items()}
    models = {k: m.clone() for k, m in algo.models.items()}
    first = engine.evaluate(2)
    assert engine.evaluate(2) == first
    assert states_equal(algo.hn, hn) and states_equal(algo.models, models)
    for cid in range(6):
        own = {k: m[cid] for k, m in models.items()}
        expected = algo.combine(algo.alphas(cid), cid) if mode == "aggregate" else own
        assert states_equal(algo.eval_state(cid, g), expected)


# -- both --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo, hp", [("pfedhn", {"hidden_dim": 32}), ("pfedla", {})])
def test_same_config_twice_gives_identical_runs(algo, hp):
    config = small_config(algo=algo, rounds=2, join_ratio=0.5, seed=3)
    first = metrics(make_engine(config, **hp).run())
    assert metrics(make_engine(config, **hp).run()) == first
    assert metrics(make_engine(config.replace(seed=4), **hp).run()) != first


@pytest.mark.parametrize("algo", ["pfedhn", "pfedla"])
def test_batchnorm_statistics_are_not_generated_or_mixed_and_stay_with_their_client(algo):
    from pflbench.core.models import MODELS

    if "smallcnn_bn" not in MODELS:
        pytest.skip("no BatchNorm model in this checkout")
    engine = make_engine(small_config(algo=algo, model="smallcnn_bn", rounds=1, join_ratio=0.5))
    algo_, g = engine.algo, engine.global_state
    params = {n for n, _ in engine.model.named_parameters()}
    stats = [k for k in algo_.all_keys if k not in params]
    if not stats:
        pytest.skip("this checkout's state holds parameters only")
    _, trained = spy_starts_and_trained(algo_)
    result = engine.run()
    sent = nbytes(subset(g, params)) if algo == "pfedhn" else nbytes(g)
    assert comm_bytes(result) == (3 * sent, 3 * sent)
    done = dict(trained)
    for cid in range(6):
        state = algo_.eval_state(cid, g)
        for k in stats:
            # pFedLA stores start + delta: the trained statistics within rounding
            torch.testing.assert_close(state[k], done[cid][k] if cid in done else g[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("algo, hp, field", [
    ("pfedhn", {"embed_dim": 0}, "embed_dim"),
    ("pfedhn", {"hidden_dim": 0}, "hidden_dim"),
    ("pfedhn", {"n_hidden": -1}, "n_hidden"),
    ("pfedhn", {"hn_lr": -0.1}, "hn_lr"),
    ("pfedhn", {"embed_lr": -0.5}, "embed_lr"),
    ("pfedhn", {"hn_momentum": 1.0}, "hn_momentum"),
    ("pfedhn", {"hn_weight_decay": -1e-3}, "hn_weight_decay"),
    ("pfedhn", {"norm_clip": -1.0}, "norm_clip"),
    ("pfedhn", {"server_step": "sequential"}, "server_step"),
    ("pfedhn", {"inner_steps": -2}, "inner_steps"),
    ("pfedhn", {"chunk_size": -1}, "chunk_size"),
    ("pfedla", {"hn_lr": float("nan")}, "hn_lr"),
    ("pfedla", {"embed_dim": 0}, "embed_dim"),
    ("pfedla", {"hidden_dim": -3}, "hidden_dim"),
    ("pfedla", {"granularity": "block"}, "granularity"),
    ("pfedla", {"normalize": "sigmoid"}, "normalize"),
    ("pfedla", {"eval": "global"}, "eval"),
])
def test_bad_hyperparameters_are_rejected(algo, hp, field):
    load_algorithms()
    with pytest.raises(UserError, match=field):
        resolve_hyperparams(get_algorithm(algo), hp)


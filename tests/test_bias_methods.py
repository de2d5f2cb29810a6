"""FedDBE (a personal bias on the features, a pull to a global feature mean) and FedCAC (critical
parameters shared only among clients with overlapping critical masks): each checked on the exact
property that defines it, its exact communication bytes, determinism and its validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import capture_uploads, comm_bytes, make_engine, metrics, small_config, states_equal
from pflbench.core.state import get_state, nbytes, set_state
from pflbench.errors import UserError


def model_bytes(engine):
    return nbytes(engine.global_state)


def sampled_per_round(engine):
    return [len(s) for s in engine.schedule]


# == FedDBE =========================================================================================

def test_feddbe_without_prbm_and_mean_regularization_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg"))
    dbe = make_engine(config.replace(algo="feddbe"), kl_weight=0.0, prbm=False)
    a, b = fedavg.run(), dbe.run()
    assert metrics(b) == metrics(a)  # communication included: no initialization period at kl_weight 0
    assert b.summary["grad_evals"] == a.summary["grad_evals"]
    assert states_equal(dbe.global_state, fedavg.global_state)


def test_feddbe_each_part_alone_changes_the_run():
    """The reduction above is not vacuous: PRBM alone, and MR alone, each move the run off FedAvg."""
    config = small_config(join_ratio=0.5, rounds=2)
    fedavg = metrics(make_engine(config.replace(algo="fedavg")).run(), with_comm=False)
    prbm_only = metrics(make_engine(config.replace(algo="feddbe"), kl_weight=0.0).run(), with_comm=False)
    mr_only = metrics(make_engine(config.replace(algo="feddbe"), prbm=False).run(), with_comm=False)
    assert prbm_only != fedavg and mr_only != fedavg


def test_feddbe_keeps_the_bias_home_and_counts_every_byte():
    engine = make_engine(small_config(algo="feddbe", rounds=2, join_ratio=0.5))
    algo = engine.algo
    seen = capture_uploads(algo, with_global=True)
    result = engine.run()
    dim = engine.model.head.in_features
    assert algo.dim == dim == 200
    # the PRBM never travels: every upload is exactly the model's parameters
    assert all(set(u.payload) == set(algo.all_keys) for uploads, _ in seen for u in uploads)
    sampled = {u.cid for uploads, _ in seen for u in uploads}
    assert set(algo.prbms) == sampled
    assert all(algo.prbms[c].shape == (dim,) and bool(algo.prbms[c].abs().sum() > 0) for c in sampled)
    # bytes: the whole model both ways per sampled client and round, plus, once, every client's
    # initial model and global mean down and its running mean up (float32)
    full, n = model_bytes(engine), len(engine.clients)
    rounds = sum(sampled_per_round(engine))
    assert comm_bytes(result) == (rounds * full + n * 4 * dim, rounds * full + n * (full + 4 * dim))


def test_feddbe_global_mean_is_the_sample_weighted_mean_of_every_clients_initial_running_mean():
    config = small_config(algo="feddbe", rounds=1, join_ratio=0.5)
    engine = make_engine(config)
    with_period = engine.run()
    fresh = make_engine(config)  # same initial model; its initialization period recomputed by hand
    algo, model = fresh.algo, fresh.model
    total = sum(c.n_train for c in fresh.clients)
    expected = torch.zeros(algo.dim)
    for cid, client in enumerate(fresh.clients):
        expected += algo.init_running_mean(cid, model) * (client.n_train / total)
    assert torch.equal(engine.algo.global_mean, expected)
    assert engine.algo.initial is None  # the initial model copy is dropped once used
    # the period trains every client once: local_epochs x all training samples more than without it
    without = make_engine(config, kl_weight=0.0).run()
    extra = config.local_epochs * total
    assert with_period.summary["grad_evals"] == without.summary["grad_evals"] + extra


def test_feddbe_momentum_one_tracks_the_batch_mean_and_the_loss_matches_a_hand_computation():
    from algorithms.feddbe import dbe_loss

    engine = make_engine(small_config(algo="feddbe"))
    model, data = engine.model, engine.trainer.data
    x, y = data.x[:16], data.y[:16]
    gen = torch.Generator().manual_seed(1)
    prbm = torch.randn(200, generator=gen)
    gmean = torch.rand(200, generator=gen)
    previous = torch.rand(200, generator=gen)
    for momentum in (1.0, 0.1):
        running = {"mean": previous.clone()}
        loss = dbe_loss(prbm, gmean, momentum, 50.0, running)(model, x, y)
        z = model.body(x)
        r = (1 - momentum) * previous + momentum * z.mean(0)
        hand = F.cross_entropy(model.head(z + prbm), y) + 50.0 * (0.5 * (r - gmean) ** 2).mean()
        assert torch.allclose(loss, hand, rtol=1e-6, atol=0)
        assert torch.allclose(running["mean"], r, rtol=0, atol=1e-6) and not running["mean"].requires_grad
    running = {"mean": previous.clone()}
    dbe_loss(None, gmean, 1.0, 50.0, running)(model, x, y)
    assert torch.equal(running["mean"], model.body(x).mean(0).detach())  # momentum 1: the batch mean


def test_feddbe_evaluates_the_global_model_plus_the_clients_bias_read_only():
    engine = make_engine(small_config(algo="feddbe", rounds=2, join_ratio=0.5))
    engine.run()
    algo, g = engine.algo, engine.global_state
    before = {c: v.clone() for c, v in algo.prbms.items()}
    x = engine.trainer.data.x[engine.clients[0].test]
    for cid in range(len(engine.clients)):
        with torch.no_grad():
            out = algo.eval_model(cid, g)(x)
            set_state(engine.model, g)
            bias = algo.prbms.get(cid, torch.zeros(algo.dim))
            assert torch.equal(out, engine.model.head(engine.model.body(x) + bias))
    assert before.keys() == algo.prbms.keys()
    assert all(torch.equal(before[c], algo.prbms[c]) for c in before)
    assert states_equal(get_state(engine.model), g)


def test_feddbe_is_deterministic():
    config = small_config(algo="feddbe", rounds=2, join_ratio=0.5)
    assert metrics(make_engine(config).run()) == metrics(make_engine(config).run())


@pytest.mark.parametrize("hp, field", [({"kl_weight": -1.0}, "kl_weight"), ({"momentum": 0.0}, "momentum"),
                                       ({"momentum": 1.5}, "momentum")])
def test_feddbe_rejects_bad_hyperparameters(hp, field):
    with pytest.raises(UserError, match=field):
        make_engine(small_config(algo="feddbe"), **hp)


# == FedCAC =========================================================================================

def random_update(gen, shapes):
    start = {f"t{i}": torch.randn(*s, generator=gen) for i, s in enumerate(shapes)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    return start, trained


def test_critical_masks_select_exactly_the_tau_fraction_of_every_tensor_by_sensitivity():
    from algorithms.fedcac import critical_masks

    gen = torch.Generator().manual_seed(0)
    start, trained = random_update(gen, [(7, 13), (13,), (3, 5, 2, 2), (1,)])
    for tau in (0.0, 0.1, 0.3, 0.5, 0.77, 1.0):
        masks = critical_masks(start, trained, tau)
        for key, mask in masks.items():
            assert mask.shape == trained[key].shape and mask.dtype == torch.bool
            assert int(mask.sum()) == int(tau * mask.numel())
            score = ((trained[key] - start[key]) * trained[key]).abs()
            if 0 < int(mask.sum()) < mask.numel():
                assert score[mask].min() >= score[~mask].max()  # the most sensitive ones
    # ties (here: zero sensitivity where nothing moved) are broken by position, still exactly k
    start = {"w": torch.zeros(10)}
    trained = {"w": torch.tensor([0.0, 0, 3, 0, 0, 1, 0, 0, 0, 0])}
    mask = critical_masks(start, trained, 0.5)["w"]
    assert mask.tolist() == [True, True, True, True, False, True, False, False, False, False]
    # the references' threshold rule instead drops zero-sensitivity elements when too few move
    mask = critical_masks(start, trained, 0.5, "threshold")["w"]
    assert mask.tolist() == [False, False, True, False, False, True, False, False, False, False]


def test_overlap_threshold_and_collaborators_follow_the_schedule_and_always_include_the_client():
    from algorithms.fedcac import collaboration_threshold, collaborators, overlap_matrix

    m = [{"w": torch.tensor([1, 1, 0, 0], dtype=torch.bool)},
         {"w": torch.tensor([1, 0, 1, 0], dtype=torch.bool)},
         {"w": torch.tensor([1, 1, 0, 0], dtype=torch.bool)},
         {"w": torch.tensor([0, 0, 1, 1], dtype=torch.bool)}]
    overlap = overlap_matrix(m)
    assert overlap[0][2] == 1.0 and overlap[0][1] == 0.5 and overlap[0][3] == 0.0
    off = [overlap[i][j] for i in range(4) for j in range(4) if i != j]
    avg = sum(off) / 12
    assert collaboration_threshold(overlap, 3, 10) == avg + 0.3 * (1.0 - avg)
    assert collaborators(overlap, 0.5) == [[0, 1, 2], [1, 0, 2, 3], [2, 0, 1], [3, 1]]
    # a threshold above every overlap leaves each client with itself alone, never with nobody
    assert collaborators(overlap, 2.0) == [[0], [1], [2], [3]]
    assert collaboration_threshold([[1.0]], 5, 10) == math.inf and collaborators([[1.0]], math.inf) == [[0]]


def test_fedcac_with_tau_zero_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg"))
    cac = make_engine(config.replace(algo="fedcac"), tau=0.0)
    a, b = fedavg.run(), cac.run()
    assert metrics(b) == metrics(a)
    assert states_equal(cac.global_state, fedavg.global_state)
    assert all(not bool(m.any()) for masks in cac.algo.masks.values() for m in masks.values())


def test_fedcac_customizes_critical_values_as_the_mean_over_collaborators():
    engine = make_engine(small_config(algo="fedcac", rounds=3, join_ratio=0.5), beta=10)
    algo = engine.algo
    seen = capture_uploads(algo, with_global=True)
    result = engine.run()
    uploads, _ = seen[-1]
    by_cid = {u.cid: u.payload for u in uploads}
    sizes = []
    for cid, group in algo.last_collaborators.items():
        assert group[0] == cid and set(group) <= set(by_cid)
        sizes.append(len(group))
        for key, mask in algo.masks[cid].items():
            assert int(mask.sum()) == int(0.5 * mask.numel())  # exactly tau of every tensor
            total = by_cid[group[0]][key].clone()
            for other in group[1:]:
                total += by_cid[other][key]
            assert torch.equal(algo.values[cid][key], (total / len(group))[mask])
    assert max(sizes) > 1  # at beta = 10 someone collaborates in round 3
    # the personalized model: global values except at the client's critical positions
    g = engine.global_state
    cid = uploads[0].cid
    state = algo.eval_state(cid, g)
    for key, mask in algo.masks[cid].items():
        assert torch.equal(state[key][~mask], g[key][~mask])
        assert torch.equal(state[key][mask], algo.values[cid][key])
    never = [c for c in range(len(engine.clients)) if c not in algo.masks]
    assert all(algo.eval_state(c, g) is g for c in never)
    assert result.summary["fedcac_collaborators_mean"] >= 1.0


def test_fedcac_past_beta_every_client_keeps_its_own_critical_values():
    engine = make_engine(small_config(algo="fedcac", rounds=2, join_ratio=0.5), beta=1)
    seen = capture_uploads(engine.algo, with_global=True)
    engine.run()
    uploads, _ = seen[-1]  # round 2: threshold = avg + 2 (max - avg) > max
    for u in uploads:
        assert engine.algo.last_collaborators[u.cid] == [u.cid]
        for key, mask in engine.algo.masks[u.cid].items():
            assert torch.equal(engine.algo.values[u.cid][key], u.payload[key][mask])


def test_fedcac_starts_a_returning_client_from_its_personalized_model_and_sends_fedavg_bytes():
    engine = make_engine(small_config(algo="fedcac", rounds=3, join_ratio=0.5))
    algo = engine.algo
    starts = []
    original = algo.client_start

    def spy(cid, g):
        expected = algo.personalized(cid, g)
        start = original(cid, g)
        starts.append((cid in algo.masks, states_equal(start, expected), states_equal(start, g)))
        return start

    algo.client_start = spy
    result = engine.run()
    assert all(same for _, same, _ in starts)
    assert any(known and not is_global for known, _, is_global in starts)  # a returning client
    assert all(is_global for known, _, is_global in starts if not known)
    # masks and customized models never travel: exactly FedAvg's bytes
    full = model_bytes(engine)
    rounds = sum(sampled_per_round(engine))
    assert comm_bytes(result) == (rounds * full, rounds * full)


def test_fedcac_threshold_rule_runs_and_both_are_deterministic():
    for select in ("topk", "threshold"):
        config = small_config(algo="fedcac", rounds=2, join_ratio=0.5)
        a, b = make_engine(config, select=select).run(), make_engine(config, select=select).run()
        assert metrics(a) == metrics(b)
        assert all(math.isfinite(r["acc"]) for r in a.rounds)


@pytest.mark.parametrize("hp, field", [({"tau": 1.5}, "tau"), ({"tau": -0.1}, "tau"), ({"beta": 0}, "beta"),
                                       ({"select": "random"}, "select")])
def test_fedcac_rejects_bad_hyperparameters(hp, field):
    with pytest.raises(UserError, match=field):
        make_engine(small_config(algo="fedcac"), **hp)


def test_fedcac_scores_parameters_only_where_the_model_has_normalization_statistics():
    from pflbench.core.models import MODELS

    if "smallcnn_bn" not in MODELS:
        pytest.skip("no BatchNorm model in this checkout")
    engine = make_engine(small_config(algo="fedcac", model="smallcnn_bn", rounds=1, clients=4, join_ratio=0.5))
    engine.run()
    params = {name for name, _ in engine.model.named_parameters()}
    assert engine.algo.masks and all(set(mask) == params for mask in engine.algo.masks.values())
    assert set(engine.global_state) > params  # the running statistics are state, never critical

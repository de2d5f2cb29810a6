"""Methods whose server builds each client's model from other clients' models (FedFomo, FedAMP):
each one's defining arithmetic checked by hand, its exact reductions to Local, its exact traffic
(the extra models downloaded included), determinism and its hyperparameter checks."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from algorithms.fedamp import FedAMP, attention_weights
from algorithms.fedfomo import SCORES, FedFomo, combine, fomo_weights
from helpers import comm_bytes, digits, first_digits16, make_engine, metrics, small_config, states_equal
from pflbench.core.algorithm import Algorithm
from pflbench.core.engine import Engine
from pflbench.core.partition import partition
from pflbench.core.registry import resolve_hyperparams
from pflbench.core.regularizers import proximal_loss
from pflbench.core.state import get_state, nbytes
from pflbench.experiments.runner import partition_spec


def engine_for(cls, config, data=None, **hp):
    """An engine running an algorithm class that is not registered (a test-local reference)."""
    data = data or digits()
    splits = partition(data.y.numpy(), partition_spec(config))
    return Engine(config, data, splits, cls, resolve_hyperparams(cls, hp), torch.device("cpu"))


def flat(state, keys):
    return torch.cat([state[k].reshape(-1) for k in keys])


def mean_ce(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y, reduction="sum")) / len(y)


# == FedFomo ==========================================================================================

def test_fomo_weights_are_nonnegative_normalized_and_proportional_to_the_positive_scores():
    scores = torch.tensor([0.3, -1.0, 0.0, 0.9], dtype=torch.float64)
    w = fomo_weights(scores)
    assert torch.all(w >= 0) and float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    assert w.tolist() == pytest.approx([0.25, 0.0, 0.0, 0.75], abs=1e-15)
    none = fomo_weights(torch.tensor([-0.5, 0.0, -2.0], dtype=torch.float64))
    assert none.tolist() == [0.0, 0.0, 0.0]
    own = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0))}
    assert combine(own, [{"w": torch.ones(3, 2)}] * 3, none) is own  # untouched: not even rounded


def test_fedfomo_start_is_the_hand_computed_first_order_combination_and_P_gets_the_raw_scores():
    # everyone joins and M covers every other client: round 2 downloads all 5 others for each client;
    # near-IID clients (alpha 100), so that some received models do help and the mix is exercised
    engine = make_engine(small_config(algo="fedfomo", rounds=2, join_ratio=1.0, alpha=100.0), M=5)
    algo = engine.algo
    seen = []
    local_train, sgd = algo.local_train, algo.fit_trainer.sgd

    def spy_local_train(cid, model, round_):
        seen.append({"cid": cid, "round": round_, "own": get_state(model), "sent": list(algo.sent[cid]),
                     "others": {j: algo.models[j] for j in algo.sent[cid]}})
        return local_train(cid, model, round_)

    def spy_sgd(model, cid, *args, **kwargs):
        seen[-1]["start"] = get_state(model)
        return sgd(model, cid, *args, **kwargs)

    algo.local_train, algo.fit_trainer.sgd = spy_local_train, spy_sgd
    engine.run()
    keys = algo.param_keys
    data, model = engine.trainer.data, algo.scratch
    moved = 0
    for rec in seen:
        if rec["round"] == 1:
            assert rec["sent"] == [] and states_equal(rec["start"], rec["own"])
            continue
        cid, own = rec["cid"], rec["own"]
        assert sorted(rec["sent"]) == [j for j in range(6) if j != cid]
        val = algo.fit_trainer.clients[cid].val
        x, y = data.x[val], data.y[val]
        model.load_state_dict(own, strict=False)
        base = mean_ce(model, x, y)
        scores = []
        for j in rec["sent"]:
            other = rec["others"][j]
            model.load_state_dict(other, strict=False)
            dist = float(torch.linalg.vector_norm(flat(other, keys).double() - flat(own, keys).double()))
            scores.append((base - mean_ce(model, x, y)) / dist)
        # the server's affinity row holds exactly what the client uploaded: its raw scores
        row = torch.tensor(algo.P[cid, rec["sent"]])
        assert torch.allclose(row, torch.tensor(scores, dtype=torch.float64), rtol=1e-4, atol=1e-7)
        positive = [max(s, 0.0) for s in scores]
        total = sum(positive)
        expected = {k: own[k].clone() for k in own}
        if total > 0:
            moved += 1
            for j, p in zip(rec["sent"], positive):
                for k in expected:
                    expected[k] += p / total * (rec["others"][j][k] - own[k])
        for k in own:
            torch.testing.assert_close(rec["start"][k], expected[k], rtol=1e-4, atol=1e-6)
    assert moved >= 3  # the check exercised real combinations


def test_fedfomo_affinity_weights_adds_the_normalized_weights_to_P():
    engine = make_engine(small_config(algo="fedfomo", rounds=2, join_ratio=1.0, alpha=100.0), M=5,
                         affinity="weights")
    engine.run()
    P = torch.tensor(engine.algo.P)
    sums = P.sum(1).tolist()
    assert (P >= 0).all() and all(s == pytest.approx(1.0) or s == 0.0 for s in sums)
    assert sum(s == pytest.approx(1.0) for s in sums) >= 3


def test_fedfomo_with_M0_is_exactly_local():
    config = small_config(join_ratio=0.5, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    engine = make_engine(config.replace(algo="fedfomo"), M=0, val_fraction=0.0)
    fomo = engine.run()
    assert metrics(fomo, with_comm=False) == metrics(local, with_comm=False)
    assert comm_bytes(fomo) == (3 * 3 * nbytes(engine.global_state), 0)


def test_fedfomo_whose_received_models_all_score_below_zero_is_exactly_local():
    config = small_config(join_ratio=0.5, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    engine = make_engine(config.replace(algo="fedfomo"), M=2, val_fraction=0.0)
    algo = engine.algo
    # every received model looks worse than the client's own: every score < 0, every weight 0
    algo.val_loss = lambda model, cid: 1.0 if model is algo.scratch else 0.0
    fomo = engine.run()
    assert fomo.summary["fomo_models_downloaded"] > 0 and fomo.summary["fomo_positive_weight_share"] == 0
    assert metrics(fomo, with_comm=False) == metrics(local, with_comm=False)


def test_fedfomo_counts_the_downloaded_models_and_the_uploaded_scores_exactly():
    M = 2
    engine = make_engine(small_config(algo="fedfomo", join_ratio=0.5, rounds=4), M=M)
    model = nbytes(engine.global_state)
    up = down = 0
    trained = set()
    for sampled in engine.schedule:
        for cid in sampled:
            received = min(M, len(trained - {cid}))
            down += received * model
            up += model + 4 * received  # the model and one float32 score per received model
        trained |= set(sampled)
    result = engine.run()
    assert down > 0
    assert comm_bytes(result) == (up, down)


def test_fedfomo_selection_is_top_M_by_affinity_at_eps0_and_explores_otherwise():
    engine = make_engine(small_config(algo="fedfomo", clients=8), M=3, eps=0.0)
    algo = engine.algo
    algo.models = {j: {} for j in range(8)}
    algo.P[2] = [5.0, 1.0, 9.0, 7.0, -1.0, 3.0, 6.0, 0.0]  # P[2, 2] is never a candidate
    assert algo.select(2, round_=1) == [3, 6, 0]
    assert algo.select(2, round_=1) == algo.select(2, round_=9)  # greedy: no randomness left
    del algo.models[3]  # only clients the server holds a model of are candidates
    assert algo.select(2, round_=1) == [6, 0, 5]
    algo.hp.M = 10
    assert sorted(algo.select(2, round_=1)) == [0, 1, 4, 5, 6, 7]  # M capped by the candidates
    explore = make_engine(small_config(algo="fedfomo", clients=8), M=3, eps=1.0, eps_decay=0.0).algo
    explore.models, explore.P = algo.models, algo.P
    picks = [explore.select(2, round_=r) for r in range(1, 41)]
    assert all(len(p) == len(set(p)) == 3 and 2 not in p and 3 not in p for p in picks)
    assert {j for p in picks for j in p} == {0, 1, 4, 5, 6, 7}  # the low-affinity ones are tried too
    assert picks == [explore.select(2, round_=r) for r in range(1, 41)]  # seeded by (seed, round, client)


def test_fedfomo_epsilon_decays_linearly_to_zero():
    algo = make_engine(small_config(algo="fedfomo")).algo
    assert [algo.epsilon(r) for r in (1, 2, 6, 7, 50)] == pytest.approx([0.3, 0.25, 0.05, 0.0, 0.0])


def test_fedfomo_holds_out_its_own_validation_samples_and_trains_on_the_rest():
    engine = make_engine(small_config(algo="fedfomo", join_ratio=0.5, rounds=2))
    algo = engine.algo
    for cid, client in enumerate(engine.clients):
        view = algo.fit_trainer.clients[cid]
        assert len(view.val) == int(0.2 * client.n_train) > 0
        assert sorted(torch.cat([view.train, view.val]).tolist()) == sorted(client.train.tolist())
        assert view.val is not client.val  # never the engine's --val-ratio split
    result = engine.run()
    per_round = [sum(algo.fit_trainer.clients[c].n_train for c in s) for s in engine.schedule]
    assert result.summary["grad_evals"] == sum(per_round)  # one local epoch, outside the carve-out


def test_fedfomo_evaluates_each_client_with_its_own_model_read_only():
    engine = make_engine(small_config(algo="fedfomo", join_ratio=0.5, rounds=1))
    initial = {k: v.clone() for k, v in engine.global_state.items()}
    engine.run()
    algo, g = engine.algo, engine.global_state
    assert states_equal(g, initial)  # no global model is ever averaged
    assert len(algo.models) == 3
    for cid in range(6):
        expected = algo.models.get(cid, initial)
        assert states_equal(algo.eval_state(cid, g), expected)
        assert states_equal(algo.eval_state(cid, g), expected)
        assert SCORES not in algo.eval_state(cid, g)


# == FedAMP ===========================================================================================

def test_fedamp_attention_weights_hand_checked_sum_to_one():
    # alphaK 0.5, sigma 2: A'(0) = 1/2, A'(2 ln 2) = e^{-ln 2} / 2 = 1/4, so xi = 1/4, 1/8 and xi_ii = 5/8
    xi_self, xi = attention_weights([0.0, 2 * math.log(2.0)], alphaK=0.5, sigma=2.0)
    assert xi == pytest.approx([0.25, 0.125], abs=1e-15) and xi_self == pytest.approx(0.625, abs=1e-15)
    assert xi_self + sum(xi) == pytest.approx(1.0, abs=1e-15)
    assert attention_weights([], alphaK=0.5, sigma=2.0) == (1.0, [])
    tiny_self, tiny = attention_weights([1e-6, 3.0], alphaK=1.0, sigma=1e-30)
    assert tiny == [0.0, 0.0] and tiny_self == 1.0  # no attention to others at all


def test_fedamp_cloud_model_is_the_hand_computed_attentive_mix_of_the_latest_models():
    engine = make_engine(small_config(algo="fedamp", join_ratio=0.5, rounds=2), alphaK=0.4, sigma=50.0)
    engine.run()
    algo = engine.algo
    keys = algo.param_keys
    assert len(algo.models) >= 4
    for cid in range(6):
        own = algo.models.get(cid, engine.global_state)
        others = [j for j in sorted(algo.models) if j != cid]
        xi = [0.4 * math.exp(-float((flat(own, keys).double() - flat(algo.models[j], keys).double()).square().sum())
                             / 50.0) / 50.0 for j in others]
        xi_self = 1.0 - sum(xi)
        assert 0 < xi_self < 1 and all(x > 0 for x in xi)
        expected = {k: xi_self * own[k].double() + sum(x * algo.models[j][k].double() for j, x in zip(others, xi))
                    for k in own}
        cloud = algo.cloud_model(cid, own)
        for k in own:
            torch.testing.assert_close(cloud[k].double(), expected[k], rtol=1e-5, atol=1e-6)


def test_fedamp_with_lamda0_is_exactly_local():
    config = small_config(join_ratio=0.5, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    amp = make_engine(config.replace(algo="fedamp"), lamda=0.0).run()
    assert metrics(amp, with_comm=False) == metrics(local, with_comm=False)


class LocalProx(Algorithm):
    """Local, each round pulled to its own starting point by coef/2 ||w - w_start||^2."""

    personal = "all"

    @dataclass
    class Hyperparams:
        coef: float = 1.0

    def local_train(self, cid, model, round_):
        anchor = get_state(model)
        return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                                    loss_fn=proximal_loss(anchor, self.hp.coef))


def test_fedamp_with_tiny_sigma_attends_to_nobody_and_is_local_with_a_proximal_term_to_itself():
    config = small_config(join_ratio=0.5, rounds=2)
    engine = make_engine(config.replace(algo="fedamp"), sigma=1e-30, lamda=0.5, alphaK=0.25)
    algo = engine.algo
    starts = []
    client_start = algo.client_start

    def spy(cid, g):
        start = client_start(cid, g)
        starts.append((start, algo.cloud[cid], len(algo.pool(cid))))
        return start

    algo.client_start = spy
    amp = engine.run()
    assert sum(n for _, _, n in starts) > 0  # there were others to attend to
    assert all(states_equal(cloud, start) for start, cloud, _ in starts)  # u_i = w_i exactly
    reference = engine_for(LocalProx, config.replace(algo="localprox"), coef=0.5 / 0.25).run()
    assert metrics(amp, with_comm=False) == metrics(reference, with_comm=False)
    local = make_engine(config.replace(algo="local")).run()
    assert metrics(amp, with_comm=False) != metrics(local, with_comm=False)  # the pull does act


def test_fedamp_sends_one_model_each_way_per_sampled_client():
    engine = make_engine(small_config(algo="fedamp", join_ratio=0.5, rounds=3))
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (3 * 3 * full, 3 * 3 * full)


def test_fedamp_pool_all_uses_every_trained_client_and_last_round_only_the_previous_uploads():
    for pool in ("all", "last_round"):
        engine = make_engine(small_config(algo="fedamp", join_ratio=0.5, rounds=3), pool=pool)
        algo = engine.algo
        pools = []
        client_start = algo.client_start
        algo.client_start = lambda cid, g: (pools.append((cid, algo.pool(cid))), client_start(cid, g))[1]
        engine.run()
        schedule = engine.schedule
        trained, previous, expected = set(), [], []
        for sampled in schedule:
            for cid in sampled:
                ids = sorted(trained) if pool == "all" else previous
                expected.append((cid, [j for j in ids if j != cid]))
            trained |= set(sampled)
            previous = sorted(sampled)
        assert pools == expected
    assert set(schedule[0]) != set(schedule[1])  # so the two pools differ in round 3


def test_fedamp_start_cloud_trains_from_u_and_start_own_from_the_own_model():
    for start in ("own", "cloud"):
        engine = make_engine(small_config(algo="fedamp", join_ratio=0.5, rounds=2), start=start, sigma=20.0)
        algo = engine.algo
        checks = []
        client_start = algo.client_start

        def spy(cid, g):
            out = client_start(cid, g)
            own = algo.models.get(cid, g)
            checks.append(states_equal(out, own if start == "own" else algo.cloud[cid]))
            checks.append(states_equal(algo.cloud[cid], own) == (not algo.pool(cid)))
            return out

        algo.client_start = spy
        engine.run()
        assert all(checks) and len(checks) == 12


def test_fedamp_evaluates_each_client_with_its_own_model_read_only():
    engine = make_engine(small_config(algo="fedamp", join_ratio=0.5, rounds=1))
    initial = {k: v.clone() for k, v in engine.global_state.items()}
    engine.run()
    algo, g = engine.algo, engine.global_state
    assert states_equal(g, initial) and len(algo.models) == 3
    for cid in range(6):
        expected = algo.models.get(cid, initial)
        assert states_equal(algo.eval_state(cid, g), expected)
        assert states_equal(algo.eval_state(cid, g), expected)


# == both =============================================================================================

@pytest.mark.parametrize("algo", ["fedfomo", "fedamp"])
def test_same_config_twice_gives_identical_runs(algo):
    config = small_config(algo=algo, join_ratio=0.5, rounds=2, eval_every=2)
    a, b = make_engine(config).run(), make_engine(config).run()
    assert metrics(a) == metrics(b)
    assert a.summary["grad_evals"] == b.summary["grad_evals"]


def small_images():
    """The first 400 digits upsampled to 16x16 (nearest): inputs the conv nets accept, offline and fast."""
    return first_digits16()


@pytest.mark.parametrize("algo", ["fedfomo", "fedamp"])
@pytest.mark.parametrize("model", ["fedavgcnn", "lenet5"])
def test_runs_on_the_conv_models(algo, model):
    config = small_config(algo=algo, model=model, clients=3, rounds=2, join_ratio=1.0, dataset="digits16")
    engine = make_engine(config, data=small_images())
    result = engine.run()
    assert all(math.isfinite(r["acc"]) and math.isfinite(r["loss"]) for r in result.rounds)
    assert len(engine.algo.models) == 3
    assert comm_bytes(result)[1] > 0  # the second round received other clients' models (or u_i)


@pytest.mark.parametrize("cls, field, value", [
    (FedFomo, "M", -1), (FedFomo, "eps", 1.5), (FedFomo, "eps_decay", -0.1), (FedFomo, "val_fraction", 1.0),
    (FedFomo, "val_fraction", -0.2), (FedFomo, "affinity", "softmax"),
    (FedAMP, "alphaK", 0.0), (FedAMP, "lamda", -1.0), (FedAMP, "sigma", 0.0), (FedAMP, "pool", "some"),
    (FedAMP, "start", "global"),
])
def test_bad_hyperparameters_name_the_field_and_the_value(cls, field, value):
    with pytest.raises(ValueError, match=rf"{field} must .*\(got '?{value}'?\)"):
        cls.Hyperparams(**{field: value})

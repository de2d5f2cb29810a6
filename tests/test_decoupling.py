"""The decoupling family: each algorithm's defining property, checked exactly."""

import pytest
import torch

from helpers import comm_bytes, make_engine, metrics, small_config, states_equal
from pflbench.core.state import get_state, nbytes, set_state, subset, weighted_mean


def test_fedobp_with_q1_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=4)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    fedobp = make_engine(config.replace(algo="fedobp"), q=1.0).run()
    assert metrics(fedobp) == metrics(fedavg)
    assert comm_bytes(fedobp) == comm_bytes(fedavg)


def test_fedobp_with_q0_and_everyone_joining_is_exactly_local():
    config = small_config(join_ratio=1.0, rounds=3)
    local = make_engine(config.replace(algo="local")).run()
    fedobp = make_engine(config.replace(algo="fedobp"), q=0.0).run()
    assert metrics(fedobp, with_comm=False) == metrics(local, with_comm=False)


def test_fedper_clients_share_the_body_and_keep_their_heads():
    engine = make_engine(small_config(algo="fedper", rounds=2))
    engine.run()
    algo, g = engine.algo, engine.global_state
    heads = []
    for cid in range(6):
        state = algo.eval_state(cid, g)
        assert states_equal(subset(state, algo.body_keys), subset(g, algo.body_keys))
        assert states_equal(subset(state, algo.head_keys), algo.kept[cid])
        heads.append(state["head.weight"])
    assert not torch.equal(heads[0], heads[1])


def test_fedbabu_head_stays_at_its_initialization(monkeypatch):
    engine = make_engine(small_config(algo="fedbabu", rounds=3, join_ratio=0.5), finetune_epochs=1)
    algo = engine.algo
    init_head = subset(engine.global_state, algo.head_keys)
    original_train = algo.local_train
    trained_heads = []

    def spy(cid, model, round_):
        stats = original_train(cid, model, round_)
        trained_heads.append(subset(get_state(model), algo.head_keys))
        return stats

    monkeypatch.setattr(algo, "local_train", spy)
    rounds = []
    result = engine.run(progress=lambda r, _: rounds.append(subset(engine.global_state, algo.head_keys)))
    assert len(trained_heads) == 9 and all(states_equal(h, init_head) for h in trained_heads)
    assert all(states_equal(h, init_head) for h in rounds)
    body = nbytes(subset(engine.global_state, algo.body_keys))
    assert comm_bytes(result) == (9 * body, 9 * body)


def test_fedbabu_evaluates_after_finetuning_from_the_global_model():
    engine = make_engine(small_config(algo="fedbabu", rounds=1), finetune_epochs=2)
    engine.run()
    g = engine.global_state
    tuned = engine.algo.eval_state(0, g)
    assert not states_equal(tuned, g)
    again = engine.algo.eval_state(0, g)
    assert states_equal(tuned, again)
    plain = make_engine(small_config(algo="fedbabu", rounds=1), finetune_epochs=0)
    plain.run()
    assert states_equal(plain.algo.eval_state(0, plain.global_state), plain.global_state)


def test_fedrep_trains_the_head_then_the_body_each_alone():
    engine = make_engine(small_config(algo="fedrep", local_epochs=3))
    algo, model = engine.algo, engine.model
    assert algo.head_epochs == 2
    set_state(model, algo.client_start(0, engine.global_state))
    before = get_state(model)
    algo.train_head(0, model, round_=1)
    after_head = get_state(model)
    assert states_equal(subset(after_head, algo.body_keys), subset(before, algo.body_keys))
    assert not states_equal(subset(after_head, algo.head_keys), subset(before, algo.head_keys))
    algo.train_body(0, model, round_=1)
    after_body = get_state(model)
    assert states_equal(subset(after_body, algo.head_keys), subset(after_head, algo.head_keys))
    assert not states_equal(subset(after_body, algo.body_keys), subset(after_head, algo.body_keys))


def test_fedrep_sends_only_the_body():
    engine = make_engine(small_config(algo="fedrep", rounds=2))
    result = engine.run()
    body = nbytes(subset(engine.global_state, engine.algo.body_keys))
    assert comm_bytes(result) == (2 * 6 * body, 2 * 6 * body)


def test_lgfedavg_averages_only_the_head():
    engine = make_engine(small_config(algo="lgfedavg", rounds=1))
    algo = engine.algo
    init = {k: v.clone() for k, v in engine.global_state.items()}
    uploads = []
    original = algo.aggregate
    algo.aggregate = lambda ups, g: uploads.extend(ups) or original(ups, g)
    result = engine.run()
    g = engine.global_state
    assert all(set(u.payload) == set(algo.head_keys) for u in uploads)
    expected_head = weighted_mean([u.payload for u in uploads], [u.n_train for u in uploads])
    assert states_equal(subset(g, algo.head_keys), expected_head)
    assert states_equal(subset(g, algo.body_keys), subset(init, algo.body_keys))
    assert set(algo.kept[0]) == set(algo.body_keys)
    head = nbytes(subset(g, algo.head_keys))
    assert comm_bytes(result) == (6 * head, 6 * head)


def test_fedobp_sends_the_whole_model_and_reports_its_budget():
    engine = make_engine(small_config(algo="fedobp", rounds=2, join_ratio=0.5), q=0.99)
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    total = sum(v.numel() for v in engine.global_state.values())
    assert result.summary["personalized_elements"] == round(0.01 * total)
    assert result.summary["personalized_fraction"] == pytest.approx(0.01, rel=1e-3)

"""The validation split: carved from training data only, test sets untouched, scored at every
evaluation, and `acc_at_best_val` selecting on it."""

import numpy as np
import pytest

from helpers import make_engine, small_config

from pflbench.core.engine import selected_by_validation
from pflbench.core.partition import PartitionSpec, partition
from pflbench.errors import UserError
from pflbench.experiments.config import RunConfig

LABELS = np.repeat(np.arange(10), 120)


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_validation_comes_out_of_training_and_leaves_test_alone(scheme):
    plain = partition(LABELS, PartitionSpec(scheme=scheme, num_clients=12, seed=4, alpha=0.3))
    carved = partition(LABELS, PartitionSpec(scheme=scheme, num_clients=12, seed=4, alpha=0.3, val_ratio=0.2))
    for p, c in zip(plain, carved):
        assert np.array_equal(p.test, c.test)
        assert len(p.val) == 0
        assert np.array_equal(np.sort(np.concatenate([c.train, c.val])), p.train)
        assert not set(c.val) & set(c.train) and not set(c.val) & set(c.test)
        assert len(c.val) == min(max(round(len(p.train) * 0.2), 1), len(p.train) - 1)


def test_validation_split_is_seeded():
    spec = PartitionSpec(scheme="dirichlet", num_clients=8, seed=2, alpha=0.5, val_ratio=0.1)
    a, b = partition(LABELS, spec), partition(LABELS, spec)
    other = partition(LABELS, PartitionSpec(scheme="dirichlet", num_clients=8, seed=3, alpha=0.5, val_ratio=0.1))
    assert all(np.array_equal(x.val, y.val) for x, y in zip(a, b))
    assert any(len(x.val) != len(y.val) or not np.array_equal(x.val, y.val) for x, y in zip(a, other))


def test_bad_validation_ratio_is_a_user_error():
    with pytest.raises(UserError, match="--val-ratio"):
        RunConfig(val_ratio=1.0)


def test_later_settings_at_their_default_keep_run_ids():
    plain = RunConfig()
    assert "val_ratio" not in plain.canonical_json() and "tuned_budget" not in plain.canonical_json()
    assert RunConfig(val_ratio=0.1).run_id() != plain.run_id()
    assert RunConfig(tuned_budget=12).run_id() != plain.run_id()
    assert RunConfig(val_ratio=0.0).run_id() == plain.run_id()


def test_every_evaluation_scores_validation_with_the_same_model():
    result = make_engine(small_config(rounds=3, val_ratio=0.2)).run()
    for r in result.rounds:
        rows = [c for c in result.clients if c["round"] == r["round"]]
        assert all(c["n_val"] >= 1 for c in rows)
        pooled = 100.0 * sum(c["correct_val"] for c in rows) / sum(c["n_val"] for c in rows)
        assert r["val_acc"] == pytest.approx(pooled)
    best = max(result.rounds, key=lambda r: r["val_acc"])
    assert result.summary["acc_at_best_val"] == best["acc"]


def test_without_validation_there_is_nothing_to_select_on():
    result = make_engine(small_config(rounds=2)).run()
    assert "val_acc" not in result.rounds[0] and "acc_at_best_val" not in result.summary
    assert "n_val" not in result.clients[0]


def test_acc_at_best_val_takes_the_earliest_of_equal_validation_scores():
    rounds = [{"round": 5, "acc": 70.0, "val_acc": 60.0}, {"round": 10, "acc": 90.0, "val_acc": 65.0},
              {"round": 15, "acc": 95.0, "val_acc": 65.0}]
    assert selected_by_validation(rounds) == {"best_val_acc": 65.0, "best_val_round": 10, "acc_at_best_val": 90.0}

"""Partition invariants: disjoint, complete, minimum sizes, determinism, skew, failure modes."""

import numpy as np
import pytest

from pflbench.errors import UserError
from pflbench.core.partition import PartitionSpec, cached_partition, label_counts, partition

LABELS = np.repeat(np.arange(10), 200)  # 2,000 samples, 10 balanced classes


def all_indices(splits):
    return np.concatenate([np.concatenate([s.train, s.test]) for s in splits])


@pytest.mark.parametrize("scheme", ["dirichlet", "shards", "iid"])
def test_clients_are_disjoint_and_cover_the_pool(scheme):
    splits = partition(LABELS, PartitionSpec(scheme=scheme, num_clients=20, seed=1, alpha=0.3))
    idx = all_indices(splits)
    assert len(idx) == len(LABELS)
    assert np.array_equal(np.sort(idx), np.arange(len(LABELS)))


def test_dirichlet_honours_min_samples_and_test_ratio():
    spec = PartitionSpec(scheme="dirichlet", num_clients=20, seed=3, alpha=0.1, min_samples=20, test_ratio=0.25)
    for s in partition(LABELS, spec):
        n = len(s.train) + len(s.test)
        assert n >= 20
        assert len(s.test) == n - min(max(round(n * 0.75), 1), n - 1)


@pytest.mark.parametrize("scheme", ["dirichlet", "shards", "iid"])
def test_same_seed_same_indices_other_seed_other_indices(scheme):
    a = partition(LABELS, PartitionSpec(scheme=scheme, num_clients=10, seed=7))
    b = partition(LABELS, PartitionSpec(scheme=scheme, num_clients=10, seed=7))
    c = partition(LABELS, PartitionSpec(scheme=scheme, num_clients=10, seed=8))
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.train, z.train) for x, z in zip(a, c))


def test_dirichlet_is_pinned_across_machines():
    """Only seeded numpy Generator draws: these exact indices are what any machine must produce."""
    splits = partition(LABELS, PartitionSpec(scheme="dirichlet", num_clients=5, seed=0, alpha=0.5))
    assert [len(s.train) + len(s.test) for s in splits] == [419, 461, 451, 293, 376]
    assert splits[0].test[:5].tolist() == [17, 35, 36, 39, 75]


def mean_label_skew(alpha, seed=0):
    """Mean total-variation distance between each client's label distribution and the pool's."""
    splits = partition(LABELS, PartitionSpec(scheme="dirichlet", num_clients=10, seed=seed, alpha=alpha))
    counts = label_counts(LABELS, splits, 10).sum(axis=1).astype(float)
    dist = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(dist - 0.1).sum(axis=1)))


def test_lower_alpha_gives_more_skew():
    skews = [np.mean([mean_label_skew(a, seed) for seed in range(3)]) for a in (0.1, 1.0, 100.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[2] < 0.1 < 0.5 < skews[0]


def test_shards_give_each_client_few_classes():
    splits = partition(LABELS, PartitionSpec(scheme="shards", num_clients=10, seed=0, classes_per_client=2))
    counts = label_counts(LABELS, splits, 10).sum(axis=1)
    assert all((c > 0).sum() <= 2 for c in counts)
    assert all(c.sum() == 200 for c in counts)


def test_impossible_dirichlet_fails_with_advice_instead_of_hanging():
    spec = PartitionSpec(scheme="dirichlet", num_clients=150, seed=0, alpha=0.01, min_samples=12)
    with pytest.raises(UserError, match="larger --alpha"):
        partition(LABELS, spec)


def test_more_clients_than_samples_is_a_user_error():
    with pytest.raises(UserError, match="fewer clients"):
        partition(LABELS[:30], PartitionSpec(scheme="iid", num_clients=40, seed=0))


def test_cache_returns_the_same_splits_without_recomputing(tmp_path, monkeypatch):
    spec = PartitionSpec(scheme="dirichlet", num_clients=8, seed=2, alpha=0.5)
    first = cached_partition(LABELS, spec, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def fail(*_):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr("pflbench.core.partition.partition", fail)
    second = cached_partition(LABELS, spec, tmp_path)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) for a, b in zip(first, second))

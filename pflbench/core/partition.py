"""Split a labelled pool across clients, then each client's share into local train and test.

A partition is a pure function of (labels, scheme, its parameters, seed): it draws only from a
seeded numpy Generator, so the same inputs give the same indices on any machine. The Dirichlet
scheme retries a bounded number of times and then fails with advice instead of looping forever
(as Flower Datasets' DirichletPartitioner does).

A validation set (`val_ratio` > 0) is carved out of each client's training share with a stream of
its own, after the train/test split: the test sets are then the same whatever the validation
ratio, so a model tuned on validation data is reported on exactly the test data of an untuned run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pflbench.atomic import save_npz
from pflbench.errors import UserError

MAX_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class PartitionSpec:
    scheme: str
    num_clients: int
    seed: int
    alpha: float = 0.1
    classes_per_client: int = 2
    min_samples: int = 10
    test_ratio: float = 0.25
    val_ratio: float = 0.0


def _no_indices() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass
class ClientSplit:
    """Pool indices of one client's samples: train, test and (when carved) validation."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray = field(default_factory=_no_indices)


def _validate(labels: np.ndarray, spec: PartitionSpec) -> None:
    if spec.num_clients < 1:
        raise UserError(f"need at least one client (got {spec.num_clients})")
    if spec.num_clients * 2 > len(labels):
        raise UserError(f"{spec.num_clients} clients but only {len(labels)} samples: each client needs "
                        "at least 2 (one to train, one to test); use fewer clients")
    if spec.scheme == "dirichlet" and spec.num_clients * spec.min_samples > len(labels):
        raise UserError(f"{spec.num_clients} clients x --min-samples {spec.min_samples} exceeds the "
                        f"{len(labels)} samples; use fewer clients or a smaller --min-samples")
    if not 0 <= spec.val_ratio < 1:
        raise UserError(f"--val-ratio must be in [0, 1) (got {spec.val_ratio}); 0.1 holds out a tenth "
                        "of each client's training share")
    if spec.scheme == "dirichlet" and spec.alpha <= 0:
        raise UserError(f"--alpha must be > 0 (got {spec.alpha})")


def dirichlet(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, Dirichlet(alpha) proportions over clients; retried until every client has
    at least `min_samples` samples.

    As in FedML and FL-bench (whose split the FedOBP authors used), a client that already holds
    its fair share (pool size / clients) gets nothing of the classes dealt after that, which
    keeps the very small and very large clients of a raw Dirichlet draw in check.
    """
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    fair_share = len(labels) / spec.num_clients
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        shares: list[list[np.ndarray]] = [[] for _ in range(spec.num_clients)]
        sizes = np.zeros(spec.num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(spec.num_clients, spec.alpha))
            open_clients = proportions * (sizes < fair_share)
            if open_clients.sum() > 0:
                proportions = open_clients / open_clients.sum()
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                shares[client].append(part)
                sizes[client] += len(part)
        smallest = int(sizes.min())
        if smallest >= spec.min_samples:
            return [np.sort(np.concatenate(parts)) for parts in shares]
    raise UserError(f"Dirichlet(alpha={spec.alpha}) over {spec.num_clients} clients left a client with "
                    f"{smallest} < --min-samples {spec.min_samples} samples after {MAX_DIRICHLET_TRIES} "
                    "tries; use a larger --alpha, fewer --clients or a smaller --min-samples")


def shards(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into equal shards, deal
    `classes_per_client` shards to each client."""
    num_shards = spec.num_clients * spec.classes_per_client
    if num_shards > len(labels):
        raise UserError(f"{spec.num_clients} clients x {spec.classes_per_client} classes per client "
                        f"needs {num_shards} shards but there are only {len(labels)} samples")
    order = np.lexsort((rng.permutation(len(labels)), labels))
    pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(spec.num_clients, spec.classes_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def iid(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), spec.num_clients)]


SCHEMES = {"dirichlet": dirichlet, "shards": shards, "iid": iid}


def split_train_test(indices: np.ndarray, test_ratio: float, rng: np.random.Generator) -> ClientSplit:
    """Shuffle a client's samples; the first (1 - test_ratio) share trains, the rest tests.
    Each side keeps at least one sample."""
    shuffled = rng.permutation(indices)
    n_train = min(max(int(round(len(shuffled) * (1 - test_ratio))), 1), len(shuffled) - 1)
    return ClientSplit(train=np.sort(shuffled[:n_train]), test=np.sort(shuffled[n_train:]))


def carve_validation(split: ClientSplit, val_ratio: float, rng: np.random.Generator) -> ClientSplit:
    """Move round(n_train * val_ratio) of a client's training samples (at least one, and never
    its last training sample) into its validation set; the test set is untouched."""
    n_train = len(split.train)
    if val_ratio <= 0 or n_train < 2:
        return split
    n_val = min(max(int(round(n_train * val_ratio)), 1), n_train - 1)
    shuffled = rng.permutation(split.train)
    return ClientSplit(train=np.sort(shuffled[n_val:]), test=split.test, val=np.sort(shuffled[:n_val]))


def partition(labels: np.ndarray, spec: PartitionSpec) -> list[ClientSplit]:
    """Client train/test index arrays into the pool. Pure in (labels, spec)."""
    labels = np.asarray(labels)
    if spec.scheme not in SCHEMES:
        raise UserError(f"unknown partition '{spec.scheme}'; choose one of {', '.join(SCHEMES)}")
    _validate(labels, spec)
    rng = np.random.default_rng(spec.seed)
    clients = SCHEMES[spec.scheme](labels, spec, rng)
    if any(len(c) < 2 for c in clients):
        raise UserError(f"the {spec.scheme} partition left a client with fewer than 2 samples; "
                        "use fewer clients")
    splits = [split_train_test(c, spec.test_ratio, rng) for c in clients]
    if spec.val_ratio > 0:
        val_rng = np.random.default_rng([spec.seed, 0x7A1])  # its own stream: test sets stay put
        splits = [carve_validation(s, spec.val_ratio, val_rng) for s in splits]
    return splits


def cache_key(labels: np.ndarray, spec: PartitionSpec) -> str:
    labels_digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()
    payload = json.dumps({"labels": labels_digest, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_partition(labels: np.ndarray, spec: PartitionSpec, cache_dir: Path | None) -> list[ClientSplit]:
    """`partition`, memoized on disk by a key of the labels' content and the spec."""
    if cache_dir is None:
        return partition(labels, spec)
    path = cache_dir / f"{cache_key(labels, spec)}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return [ClientSplit(train=f[f"train_{i}"], test=f[f"test_{i}"], val=f[f"val_{i}"])
                        for i in range(spec.num_clients)]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed and overwritten
    splits = partition(labels, spec)
    try:
        save_npz(path, {f"{side}_{i}": getattr(s, side) for i, s in enumerate(splits) for side in ("train", "test", "val")})
    except OSError:
        pass  # an unwritable cache folder only costs recomputation
    return splits


def label_counts(labels: np.ndarray, splits: list[ClientSplit], num_classes: int) -> np.ndarray:
    """Array [client, split (0 train, 1 test, 2 validation), class] of sample counts."""
    counts = np.zeros((len(splits), 3, num_classes), dtype=np.int64)
    for i, s in enumerate(splits):
        for side, idx in enumerate((s.train, s.test, s.val)):
            counts[i, side] = np.bincount(labels[idx], minlength=num_classes)
    return counts

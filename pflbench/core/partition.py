"""Split a labelled pool across clients, then each client's share into local train and test.

A partition is a pure function of (labels, scheme, its parameters, seed): it draws only from a
seeded numpy Generator, so the same inputs give the same indices on any machine. The schemes are in
:mod:`pflbench.core.schemes` (label skew, quantity skew) and :mod:`pflbench.core.natural` (clients
given by the dataset).

A validation set (`val_ratio` > 0) is carved out of each client's training share with a stream of
its own, after the train/test split: the test sets are then the same whatever the validation
ratio, so a model tuned on validation data is reported on exactly the test data of an untuned run.

Holdout clients (`holdout` > 0) are a seeded share of the clients that never train (they are never
sampled) and are scored as newcomers; which clients they are is part of the partition's key, drawn
from a stream of its own so the splits themselves do not change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pflbench.atomic import save_npz
from pflbench.core.natural import NaturalClients, natural_clients
from pflbench.core.schemes import ALPHA_SCHEMES, SCHEMES, SIZE_DISTRIBUTIONS
from pflbench.errors import UserError

LATER_FIELDS = {"sigma": 1.0, "size_dist": "lognormal", "holdout": 0.0, "natural_pick": "largest"}


@dataclass(frozen=True)
class PartitionSpec:
    """Everything that determines a partition (with the labels, and the client ids of a natural
    one). Fields added after partitions were cached are left out of the cache key at their
    defaults (`LATER_FIELDS`), so adding one never invalidates the cache."""

    scheme: str
    num_clients: int
    seed: int
    alpha: float = 0.1
    classes_per_client: int = 2
    min_samples: int = 10
    test_ratio: float = 0.25
    val_ratio: float = 0.0
    sigma: float = 1.0
    size_dist: str = "lognormal"
    holdout: float = 0.0
    natural_pick: str = "largest"


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
    if spec.scheme in ("dirichlet", "exdir", "quantity") and spec.num_clients * spec.min_samples > len(labels):
        raise UserError(f"{spec.num_clients} clients x --min-samples {spec.min_samples} exceeds the "
                        f"{len(labels)} samples; use fewer clients or a smaller --min-samples")
    if not 0 <= spec.val_ratio < 1:
        raise UserError(f"--val-ratio must be in [0, 1) (got {spec.val_ratio}); 0.1 holds out a tenth "
                        "of each client's training share")
    if spec.scheme in ALPHA_SCHEMES and spec.alpha <= 0:
        raise UserError(f"--alpha must be > 0 (got {spec.alpha})")
    num_classes = len(np.unique(labels))
    if spec.scheme == "exdir" and spec.classes_per_client > num_classes:
        raise UserError(f"--classes-per-client {spec.classes_per_client} exceeds the {num_classes} classes; "
                        f"pass at most {num_classes} with --partition exdir")
    if spec.scheme == "quantity" and spec.size_dist not in SIZE_DISTRIBUTIONS:
        raise UserError(f"unknown --size-dist '{spec.size_dist}'; choose one of {', '.join(SIZE_DISTRIBUTIONS)}")
    if spec.scheme == "quantity" and not spec.sigma > 0:
        raise UserError(f"--sigma must be > 0 (got {spec.sigma}); 1.0 is a moderate quantity skew")
    if not 0 <= spec.holdout < 1:
        raise UserError(f"--holdout-clients must be in [0, 1) (got {spec.holdout}); 0.2 holds out a fifth "
                        "of the clients")
    if spec.holdout > 0 and spec.num_clients < 2:
        raise UserError("--holdout-clients needs at least 2 clients (one to train, one held out)")


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


def partition(labels: np.ndarray, spec: PartitionSpec, natural: NaturalClients | None = None
              ) -> list[ClientSplit]:
    """Client train/test index arrays into the pool. Pure in (labels, spec, natural)."""
    labels = np.asarray(labels)
    if spec.scheme != "natural" and spec.scheme not in SCHEMES:
        raise UserError(f"unknown partition '{spec.scheme}'; choose one of {', '.join([*SCHEMES, 'natural'])}")
    _validate(labels, spec)
    rng = np.random.default_rng(spec.seed)
    if spec.scheme == "natural":
        if natural is None:
            raise UserError("--partition natural needs a dataset .npz with client_train and client_test "
                            "arrays (a client id per sample); see the README's natural partitions")
        splits = [ClientSplit(train=tr, test=te)
                  for tr, te in natural_clients(natural, spec.num_clients, spec.natural_pick, rng)]
    else:
        clients = SCHEMES[spec.scheme](labels, spec, rng)
        if any(len(c) < 2 for c in clients):
            raise UserError(f"the {spec.scheme} partition left a client with fewer than 2 samples; "
                            "use fewer clients")
        splits = [split_train_test(c, spec.test_ratio, rng) for c in clients]
    if spec.val_ratio > 0:
        val_rng = np.random.default_rng([spec.seed, 0x7A1])  # its own stream: test sets stay put
        splits = [carve_validation(s, spec.val_ratio, val_rng) for s in splits]
    return splits


def holdout_count(fraction: float, num_clients: int) -> int:
    """round(fraction x clients), at least one when the fraction is positive, never all."""
    if fraction <= 0:
        return 0
    return min(max(int(round(fraction * num_clients)), 1), num_clients - 1)


def holdout_clients(fraction: float, num_clients: int, seed: int) -> tuple[int, ...]:
    """The clients that never train (`holdout_count` of them), drawn from a stream of their own,
    so the same key holds out the same clients and the splits do not change."""
    count = holdout_count(fraction, num_clients)
    if not count:
        return ()
    rng = np.random.default_rng([seed, 0x401D])
    return tuple(sorted(int(c) for c in rng.choice(num_clients, count, replace=False)))


def cache_key(labels: np.ndarray, spec: PartitionSpec, natural: NaturalClients | None = None) -> str:
    labels_digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()
    fields = {k: v for k, v in asdict(spec).items() if LATER_FIELDS.get(k, object()) != v}
    payload = {"labels": labels_digest, **fields}
    if spec.scheme == "natural" and natural is not None:
        ids = np.ascontiguousarray(natural.ids, dtype=np.int64).tobytes()
        payload["natural"] = hashlib.sha256(ids + np.packbits(natural.is_test).tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cached_partition(labels: np.ndarray, spec: PartitionSpec, cache_dir: Path | None,
                     natural: NaturalClients | None = None) -> list[ClientSplit]:
    """`partition`, memoized on disk by a key of the labels' content and the spec."""
    if cache_dir is None:
        return partition(labels, spec, natural)
    path = cache_dir / f"{cache_key(labels, spec, natural)}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return [ClientSplit(train=f[f"train_{i}"], test=f[f"test_{i}"], val=f[f"val_{i}"])
                        for i in range(spec.num_clients)]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed and overwritten
    splits = partition(labels, spec, natural)
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

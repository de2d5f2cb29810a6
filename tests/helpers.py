"""Small builders shared by the tests: digits data (offline, 1797 samples) and engines over it."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from pflbench.experiments.config import RunConfig
from pflbench.core.data import Dataset, load_dataset
from pflbench.core.engine import Engine
from pflbench.core.partition import partition
from pflbench.core.registry import ALGORITHMS, get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.experiments.runner import partition_spec


@functools.lru_cache(maxsize=None)
def digits() -> Dataset:
    return load_dataset("digits", Path("/nonexistent-data-root"))


def small_config(**changes) -> RunConfig:
    base = dict(dataset="digits", clients=6, rounds=3, local_epochs=1, batch_size=16, lr=0.05,
                eval_every=1, alpha=0.5, model="mlp", seed=0)
    base.update(changes)
    if "model" not in changes and needs_batchnorm(base.get("algo")):
        base["model"] = "auto"  # a BatchNorm model (smallcnn_bn on digits), as the CLI's default gives
    return RunConfig(**base)


def needs_batchnorm(algo: str | None) -> bool:
    load_algorithms()
    cls = ALGORITHMS.get(algo or "")
    return cls is not None and cls.model_needs == "batchnorm"


def make_engine(config: RunConfig, data: Dataset | None = None, device: str = "cpu", **hp) -> Engine:
    load_algorithms()
    data = data or digits()
    cls = get_algorithm(config.algo)
    splits = partition(data.y.numpy(), partition_spec(config))
    return Engine(config, data, splits, cls, resolve_hyperparams(cls, hp), torch.device(device))


def states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def metrics(result, with_comm=True):
    """A run's comparable output: evaluation rows (timing and compute counts removed; comm too if
    asked) and client rows. Compute is left out because an exact reduction (APFL with alpha fixed
    at 0 = FedAvg) gives the same numbers while doing more work."""
    rounds = [{k: v for k, v in r.items() if k != "grad_evals"} for r in without_timing(result.rounds)]
    if not with_comm:
        rounds = [{k: v for k, v in r.items() if not k.startswith("comm_")} for r in rounds]
    return rounds, result.clients


def comm_bytes(result):
    return result.summary["comm_up_bytes"], result.summary["comm_down_bytes"]


def finite_accuracy(result):
    return all(math.isfinite(r["acc"]) and 0.0 <= r["acc"] <= 100.0 for r in result.rounds)


def capture_uploads(algo, with_global: bool = False) -> list:
    """Record every round's uploads as the engine hands them to `aggregate` (replacing it forces
    the collected-list path); with `with_global`, each entry is (uploads, a copy of the global
    state they were aggregated onto)."""
    seen = []
    original = algo.aggregate

    def spy(uploads, global_state):
        if with_global:
            seen.append((list(uploads), {k: v.clone() for k, v in global_state.items()}))
        else:
            seen.append(list(uploads))
        return original(uploads, global_state)

    algo.aggregate = spy
    return seen


def first_digits16(n: int = 400) -> Dataset:
    """The first `n` of `digits16`: enough for a couple of clients of a conv net, fast on a CPU."""
    data = digits16()
    return Dataset("digits16", data.x[:n], data.y[:n], data.num_classes)


@functools.lru_cache(maxsize=None)
def digits16() -> Dataset:
    """Digits upsampled to 16x16 (nearest): small images the conv nets (fedavgcnn, fedavgcnn_bn)
    accept, still offline and fast."""
    import torch.nn.functional as F

    data = digits()
    return Dataset("digits16", F.interpolate(data.x, size=(16, 16), mode="nearest"), data.y, data.num_classes)

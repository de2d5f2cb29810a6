"""From a RunConfig to a written run record: load, partition, train, write.

Shared by `pflbench run` and the sweep, so a cell of a sweep is exactly a single run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from pflbench.core.data import Dataset, load_dataset
from pflbench.core.engine import Engine, ProgressFn, resolve_device
from pflbench.core.feature_skew import apply_feature_skew
from pflbench.core.partition import ClientSplit, PartitionSpec, cached_partition, label_counts
from pflbench.core.registry import get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.core.skew import skew_measures
from pflbench.errors import UserError
from pflbench.experiments.config import RunConfig
from pflbench.experiments.records import RunRecord, failed_record, write_run


def partition_spec(config: RunConfig) -> PartitionSpec:
    return PartitionSpec(scheme=config.partition, num_clients=config.clients, seed=config.seed,
                         alpha=config.alpha, classes_per_client=config.classes_per_client,
                         min_samples=config.min_samples, test_ratio=config.test_ratio,
                         val_ratio=config.val_ratio, sigma=config.sigma, size_dist=config.size_dist,
                         holdout=config.holdout_clients, natural_pick=config.natural_pick)


def with_feature_skew(data: Dataset, splits: list[ClientSplit], config: RunConfig) -> Dataset:
    """The dataset with each client's samples seen through its own transform (`--feature-skew`),
    applied once here, before training, never per batch."""
    if config.feature_skew == "none" or config.skew_strength == 0:
        return data
    rows = [np.concatenate([s.train, s.test, s.val]) for s in splits]
    x = apply_feature_skew(data.x, rows, config.feature_skew, config.skew_strength, config.seed)
    return dataclasses.replace(data, x=x)


def check_classes_per_client(config: RunConfig, num_classes: int) -> None:
    """A shards partition cannot give a client more classes than the dataset has (it would
    silently give fewer): a mistake only the loaded dataset can reveal."""
    if config.partition == "shards" and config.classes_per_client > num_classes:
        raise UserError(f"--classes-per-client {config.classes_per_client} exceeds the {num_classes} classes of "
                        f"{config.dataset}; pass at most {num_classes} with --partition shards")


def compute_run(config: RunConfig, data_root: Path, device: str = "auto", plugins: Iterable[str] = (),
                progress: ProgressFn | None = None, cache_dir: Path | None = None) -> RunRecord:
    """Train the run `config` describes and return its record (nothing is written but the
    partition cache)."""
    load_algorithms(plugins)
    algorithm_cls = get_algorithm(config.algo)
    hyperparams = resolve_hyperparams(algorithm_cls, config.hp)
    torch_device = resolve_device(device)
    data = load_dataset(config.dataset, data_root)
    check_classes_per_client(config, data.num_classes)
    labels = data.y.numpy()
    splits = cached_partition(labels, partition_spec(config), cache_dir, data.natural)
    data = with_feature_skew(data, splits, config)
    result = Engine(config, data, splits, algorithm_cls, hyperparams, torch_device).run(progress)
    counts = label_counts(labels, splits, data.num_classes)
    summary = {**result.summary, **skew_measures(counts)}
    return RunRecord(config=config, hyperparams=dataclasses.asdict(hyperparams), device=str(torch_device),
                     threads=torch.get_num_threads(), summary=summary, rounds=result.rounds,
                     clients=result.clients, label_counts=counts)


def partition_cache(results: Path) -> Path:
    return Path(results) / ".cache" / "partitions"


def execute(config: RunConfig, results: Path, data_root: Path, device: str = "auto",
            plugins: Iterable[str] = (), progress: ProgressFn | None = None) -> Path:
    """Train one run and write its record under `results`; returns the record's folder.

    A run that diverges (NaN loss) is recorded as failed, exactly as a sweep records it, and is
    then a UserError naming the round, the fix and the failed record."""
    try:
        record = compute_run(config, data_root, device, plugins, progress, partition_cache(results))
    except FloatingPointError as exc:
        path = write_run(results, failed_record(config, exc))
        first_line = (str(exc).splitlines() or ["training diverged; lower --lr"])[0]
        raise UserError(f"{first_line} (failed record: {path})") from None
    return write_run(results, record)

"""A run's record on disk: `<results>/runs/<run_id>/` with config, summary, rounds, clients.

The record is written into a temporary folder and renamed into place as a whole, so a record
that exists is complete: a killed run leaves no partial record behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pflbench.atomic import write_json
from pflbench.experiments.config import RunConfig

RUNS = "runs"
STAGING_PREFIX = ".staging-"


def library_versions() -> dict[str, str]:
    import sklearn
    import torch
    import torchvision

    import pflbench

    return {"python": platform.python_version(), "pflbench": pflbench.__version__,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "scikit-learn": sklearn.__version__}


def partition_table(label_counts: np.ndarray) -> pd.DataFrame:
    """Rows (client, split) with one column per class: the label distribution of the partition."""
    rows = []
    for cid, per_split in enumerate(label_counts):
        for split, counts in zip(("train", "test", "val"), per_split):
            if split == "val" and not counts.any():
                continue  # no validation set carved
            rows.append({"client": cid, "split": split, **{f"class_{c}": int(v) for c, v in enumerate(counts)}})
    return pd.DataFrame(rows)


def run_dir(results: Path, run_id: str) -> Path:
    return Path(results) / RUNS / run_id


@dataclass
class RunRecord:
    """Everything a run leaves behind, as plain data: it crosses process (and Ray) boundaries
    and is written by the process that owns the results folder."""

    config: RunConfig
    hyperparams: dict[str, Any]
    device: str
    summary: dict[str, Any]
    # torch's CPU thread count during training: CPU kernels reduce in an order that depends on
    # it, so a run repeats bit for bit only at the same count (0: not known, a failed run)
    threads: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    label_counts: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def failed_record(config: RunConfig, error: BaseException) -> RunRecord:
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    return RunRecord(config=config, hyperparams=config.hp, device="", error=message,
                     summary={"algo": config.algo, "dataset": config.dataset, "partition": config.partition,
                              "alpha": config.alpha, "seed": config.seed})


def write_run(results: Path, record: RunRecord) -> Path:
    """Write the whole record at once (a failed run: its config and error); an older record of the
    same id is replaced."""
    config = record.config
    target = run_dir(results, config.run_id())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{STAGING_PREFIX}{target.name}."))
    try:
        write_json(staging / "config.json", {"run_id": config.run_id(), "config": config.to_dict(),
                                             "hyperparams": record.hyperparams, "device": record.device,
                                             "threads": record.threads, "versions": library_versions()})
        status = {"status": "ok"} if record.ok else {"status": "failed", "error": record.error}
        write_json(staging / "summary.json", {"run_id": config.run_id(), **status, **record.summary})
        if record.ok:
            pd.DataFrame(record.rounds).to_csv(staging / "rounds.csv", index=False)
            pd.DataFrame(record.clients).to_csv(staging / "clients.csv", index=False)
            partition_table(record.label_counts).to_csv(staging / "partition.csv", index=False)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def read_summary(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_status(results: Path, run_id: str) -> str | None:
    """'ok', 'failed', or None where no complete record exists."""
    path = run_dir(results, run_id) / "summary.json"
    if not path.exists():
        return None
    try:
        return read_summary(path).get("status")
    except (OSError, ValueError):
        return None


def remove_stale_staging(results: Path) -> list[Path]:
    """Delete staging folders a killed writer left behind; they are never complete records."""
    runs = Path(results) / RUNS
    stale = sorted(runs.glob(f"{STAGING_PREFIX}*")) if runs.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale

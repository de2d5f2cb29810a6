"""Published numbers for the FedOBP paper's protocol, shown beside ours where a cell ran it.

`published.csv` (shipped with the package) holds, per (dataset, alpha, algo), pooled test
accuracy in percent from two sources: `fedobp_paper_2026`, the FedOBP paper's own headline results
(arXiv 2604.16574; FedOBP only; probably a mean over runs, q tuned per cell), and
`authors_logs_2025_01`, the authors' public FL-bench logs (github.com/uglyghost/FedOBP_results,
January 2025; one seed, FL-bench's baseline variants). The logs' `acc` is the maximum over the
evaluations at rounds 100, 200, 300 and 400, so it is compared with our `best_acc` under the
same schedule (evaluation every 100 rounds): a cell shows published numbers only when it ran
exactly the paper's protocol (the `fedobp` preset: clients, sampling, rounds, local epochs,
batch, optimizer, model, split, evaluation schedule), never for other protocols.

pandas only: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
SOURCES = ("authors_logs_2025_01", "fedobp_paper_2026")

# The FedOBP paper's protocol (its spec, and the `fedobp` preset); weight decay is 0 there.
PROTOCOL: dict[str, Any] = {
    "partition": "dirichlet", "clients": 100, "join_ratio": 0.1, "rounds": 400, "local_epochs": 5,
    "batch_size": 32, "lr": 0.01, "momentum": 0.7, "weight_decay": 0.0, "model": "fedavgcnn",
    "test_ratio": 0.25, "min_samples": 10, "eval_every": 100,
}


def is_paper_protocol(config: Mapping[str, Any]) -> bool:
    """True when a run's configuration is the FedOBP paper's protocol (any dataset, alpha, seed)."""
    return all(config.get(key) == value for key, value in PROTOCOL.items())


def load_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    return pd.read_csv(path)


def attach_published(board: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add, for each source, `published_<source>` and `best_acc_vs_<source>` (ours minus
    published, in points) to the leaderboard rows whose `paper_protocol` is true; other rows
    stay empty. Columns appear only where at least one row has a published number."""
    if board.empty or "paper_protocol" not in board:
        return board
    published = load_published() if published is None else published
    out = board.copy()
    for source in SOURCES:
        numbers = published[published["source"] == source][["dataset", "alpha", "algo", "acc"]]
        numbers = numbers.rename(columns={"acc": f"published_{source}"})
        merged = out[["dataset", "alpha", "algo"]].merge(numbers, how="left", on=["dataset", "alpha", "algo"])
        values = merged[f"published_{source}"].where(out["paper_protocol"].to_numpy().astype(bool))
        if values.notna().any():
            out[f"published_{source}"] = values.to_numpy()
            out[f"best_acc_vs_{source}"] = out["best_acc"] - out[f"published_{source}"]
    return out

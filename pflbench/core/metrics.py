"""Accuracy figures from per-client evaluation rows, weighted, unweighted and fairness side by side.

`acc` pools every client's test samples (correct / samples: the convention of the FedOBP paper,
FL-bench and PFLlib); `acc_client_mean`, `acc_client_std` and `acc_client_p10` describe the
distribution of per-client accuracies, so a method that serves large clients well and small ones
badly is visible. All figures are percentages. Where clients have validation sets, `val_acc`
(pooled) and `val_loss` score the same models on them.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def accuracy_figures(n: Iterable[int], correct: Iterable[int], suffix: str = "") -> dict[str, float]:
    n_arr = np.asarray(list(n), dtype=np.float64)
    c_arr = np.asarray(list(correct), dtype=np.float64)
    per_client = 100.0 * c_arr / n_arr
    return {
        f"acc{suffix}": float(100.0 * c_arr.sum() / n_arr.sum()),
        f"acc_client_mean{suffix}": float(per_client.mean()),
        f"acc_client_std{suffix}": float(per_client.std()),
        f"acc_client_p10{suffix}": float(np.percentile(per_client, 10)),
    }


def evaluation_figures(client_rows: list[Mapping[str, float]]) -> dict[str, float]:
    """All figures of one evaluation; the `_ft` set too where fine-tuned results are present.

    Holdout clients (rows with `holdout` true: they never trained) are kept apart: the usual
    figures describe the clients that trained, and `acc_new` (with its client mean, std and p10,
    and `acc_new_ft` after fine-tuning) the newcomers; `participation_gap` is `acc - acc_new`."""
    newcomers = [r for r in client_rows if r.get("holdout")]
    figures = _figures([r for r in client_rows if not r.get("holdout")])
    if newcomers:
        n = [r["n_test"] for r in newcomers]
        figures.update(_renamed(accuracy_figures(n, [r["correct"] for r in newcomers]), "new"))
        if "correct_ft" in newcomers[0]:
            figures.update(_renamed(accuracy_figures(n, [r["correct_ft"] for r in newcomers]), "new_ft"))
        figures["participation_gap"] = figures["acc"] - figures["acc_new"]
    return figures


def _renamed(figures: dict[str, float], tag: str) -> dict[str, float]:
    """`acc` -> `acc_<tag>`, `acc_client_mean` -> `acc_<tag>_client_mean`, ..."""
    return {f"acc_{tag}" + k[len("acc"):]: v for k, v in figures.items()}


def _figures(client_rows: list[Mapping[str, float]]) -> dict[str, float]:
    n = [r["n_test"] for r in client_rows]
    figures = accuracy_figures(n, [r["correct"] for r in client_rows])
    figures["loss"] = float(sum(r["loss"] * r["n_test"] for r in client_rows) / sum(n))
    scored = [r for r in client_rows if r.get("n_val")]
    if scored:
        n_val = sum(r["n_val"] for r in scored)
        figures["val_acc"] = float(100.0 * sum(r["correct_val"] for r in scored) / n_val)
        figures["val_loss"] = float(sum(r["loss_val"] * r["n_val"] for r in scored) / n_val)
    if client_rows and "correct_ft" in client_rows[0]:
        figures.update(accuracy_figures(n, [r["correct_ft"] for r in client_rows], suffix="_ft"))
    return figures

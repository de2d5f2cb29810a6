"""Leaderboard tables from stored run records (pandas only: no torch, no training).

Runs are grouped by (dataset, partition, alpha, algo, hyperparameters, protocol), where the
protocol is every other setting that changes results (clients, rounds, epochs, lr, model, ...),
so runs of different protocols are never averaged together. Cells run with tuned hyperparameters
(`pflbench sweep --tuned`) form a protocol of their own, labelled `-tuned<budget>`, in which the
learning rate is one of the chosen values rather than a shared setting: tuned rows are compared
with each other and never averaged with untuned ones. A tuned algorithm is one entry across the
cells (`hp` reads `tuned`), though its choice differs per cell; `chosen` holds each cell's values.

Beside accuracy, each row carries the algorithm's declared test-time adaptation (`eval_adapt`:
FedBABU's `acc` already includes its fine-tuning, FedAvg's does not), its local compute in
sample-gradients (`grad_evals`, and `grad_evals_vs_fedavg`, its ratio to FedAvg's in the same
cell), and, for cells run under the FedOBP paper's protocol, the published numbers
(:mod:`pflbench.analysis.published`).

Uncertainty comes from :mod:`pflbench.analysis.statistics`: per row a 95% interval (hierarchical bootstrap
over seeds and clients), paired differences with the cell's best, FedAvg and Local with their
intervals and Holm-corrected p-values, and `tied_best`. The wide tables rank algorithms by their
mean rank over the cells, and `ranking.csv` holds the Friedman test and the Nemenyi critical
difference of each protocol.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from pflbench.atomic import write_text
from pflbench.analysis.published import attach_published, is_paper_protocol
from pflbench.analysis.ranking import rank_test, ranking_value
from pflbench.analysis.statistics import CELL, leaderboard_statistics
from pflbench.experiments.config import protocol_key
from pflbench.experiments.records import RUNS

PROTOCOL_KEYS = ("clients", "join_ratio", "rounds", "local_epochs", "batch_size", "lr", "momentum",
                 "weight_decay", "model", "eval_every", "finetune_epochs", "test_ratio", "min_samples",
                 "classes_per_client")
LATER_PROTOCOL_KEYS = {"val_ratio": 0.0, "precision": "fp32", "sigma": 1.0, "size_dist": "lognormal",
                       "natural_pick": "largest", "feature_skew": "none", "skew_strength": 0.0,
                       "holdout_clients": 0.0}  # in the label's hash only where set (older records lack them)
# clients never seen in training (--holdout-clients) and the partition's measured skew
NEWCOMER_METRICS = ("acc_new", "acc_new_ft", "participation_gap")
SKEW_METRICS = ("skew_hellinger", "skew_js", "size_cv")
GROUP = ["dataset", "partition", "alpha", "algo", "hp", "protocol"]
TIMING = ("wall_s",)


def protocol_label(config: dict) -> str:
    """Readable and unique: e.g. `c50j0.2-r30-e5-fedavgcnn-1a2b3c`, marked `-bf16` for bf16 runs,
    `-ft1` where every client's model is also fine-tuned one epoch at evaluation (`acc_ft`; the
    training is the same as without it), then the heterogeneity tags, and `-tuned12` for tuned cells."""
    keyed = {k: config[k] for k in PROTOCOL_KEYS}
    keyed.update({k: config[k] for k, default in LATER_PROTOCOL_KEYS.items() if config.get(k, default) != default})
    budget = config.get("tuned_budget", 0)
    if budget:
        keyed["lr"] = "tuned"
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
    return (f"c{config['clients']}j{config['join_ratio']:g}-r{config['rounds']}-e{config['local_epochs']}"
            f"-{config['model']}-{digest[:6]}" + (f"-{config['precision']}" if config.get("precision", "fp32") != "fp32"
                                                  else "")
            + (f"-ft{config['finetune_epochs']}" if config.get("finetune_epochs", 0) else "") + heterogeneity_tags(config)
            + (f"-tuned{budget}" if budget else ""))


def heterogeneity_tags(config: dict) -> str:
    """Readable marks of the settings beyond the partition's name: `-holdout0.2`, `-rotate30`,
    `-sigma2` (quantity skew), `-powerlaw`; empty for a plain label-skew protocol."""
    tags = []
    if config.get("partition") == "quantity":
        tags.append(f"sigma{config.get('sigma', 1.0):g}")
        if config.get("size_dist", "lognormal") != "lognormal":
            tags.append(config["size_dist"])
    if config.get("feature_skew", "none") != "none":
        tags.append(f"{config['feature_skew']}{config.get('skew_strength', 0.0):g}")
    if config.get("holdout_clients", 0.0):
        tags.append(f"holdout{config['holdout_clients']:g}")
    return "".join(f"-{t}" for t in tags)


def hp_label(hp: dict, config: dict | None = None) -> str:
    """The hyperparameters (with `config` of a tuned cell: the chosen learning rate too)."""
    shown = dict(hp)
    if config and config.get("tuned_budget", 0):
        shown["lr"] = f"{config['lr']:.4g}"
    return ",".join(f"{k}={v}" for k, v in sorted(shown.items()))


def load_runs(results: Path) -> pd.DataFrame:
    """One row per complete run record (ok or failed), with its config and summary."""
    rows = []
    runs = Path(results) / RUNS
    for summary_path in sorted(runs.glob("*/summary.json")) if runs.is_dir() else []:
        try:
            summary = json.loads(summary_path.read_text())
            record = json.loads((summary_path.parent / "config.json").read_text())
            config = record["config"]
        except (OSError, ValueError, KeyError):
            continue
        rows.append({**summary, "run_dir": str(summary_path.parent), "hp": "tuned" if config.get("tuned_budget", 0) else hp_label(config["hp"]),
                     "chosen": hp_label(config["hp"], config) if config.get("tuned_budget", 0) else "",
                     "protocol": protocol_label(config), "clients": config["clients"],
                     "rounds": config["rounds"], "tuned_budget": config.get("tuned_budget", 0),
                     "tuned_study": config.get("tuned_study", ""), "settings_key": protocol_key(config),
                     "paper_protocol": is_paper_protocol(config), "device": record.get("device") or "unknown"})
    return pd.DataFrame(rows)


def long_leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group: mean over seeds (and the std of `acc`), best first within each setting."""
    ok = runs[runs["status"] == "ok"].copy() if len(runs) else runs
    if ok.empty:
        return pd.DataFrame(columns=[*GROUP, "seeds", "acc", "acc_std"])
    ok["comm_mb"] = (ok["comm_up_bytes"] + ok["comm_down_bytes"]) / 1e6
    metrics = ["acc", "acc_client_mean", "acc_client_p10", "best_acc", "acc_at_best_val", "val_acc", "acc_ft",
               *NEWCOMER_METRICS, "comm_mb", "grad_evals", "eval_grad_evals", *SKEW_METRICS, "wall_s"]
    metrics = [m for m in metrics if m in ok.columns]
    labels = [c for c in ("eval_adapt", "tuned_budget", "chosen", "paper_protocol") if c in ok.columns]
    grouped = ok.groupby(GROUP, dropna=False)
    board = grouped[metrics].mean()
    board.insert(0, "seeds", grouped.size())
    board.insert(2, "acc_std", grouped["acc"].std(ddof=1))  # empty with one seed: no spread to show
    for label in labels:
        board[label] = grouped[label].first()
    board = board.reset_index()
    for optional in ("acc_ft", "acc_at_best_val", "val_acc", *NEWCOMER_METRICS, *SKEW_METRICS):
        if optional in board and board[optional].isna().all():
            board = board.drop(columns=optional)
    if "grad_evals" in board:
        board.insert(board.columns.get_loc("grad_evals") + 1, "grad_evals_vs_fedavg", relative_to_fedavg(board))
    board = board.merge(leaderboard_statistics(runs), how="left", on=GROUP)
    board["rank"] = cell_ranks(board)
    board = attach_published(board)
    return board.sort_values(["dataset", "protocol", "partition", "alpha", ranking_value(board)],
                             ascending=[True, True, True, True, False]).reset_index(drop=True)


def relative_to_fedavg(board: pd.DataFrame, column: str = "grad_evals") -> pd.Series:
    """`column` divided by FedAvg's in the same (dataset, partition, alpha, protocol) cell; empty
    where FedAvg did not run there (or its record predates the column)."""
    cell = ["dataset", "partition", "alpha", "protocol"]
    fedavg = board[board["algo"] == "fedavg"].groupby(cell, dropna=False)[column].first().rename("_fedavg")
    joined = board[cell].merge(fedavg.reset_index(), how="left", on=cell)
    return (board[column].to_numpy() / joined["_fedavg"].to_numpy()).round(4)


def cell_ranks(board: pd.DataFrame) -> pd.Series:
    """Rank within each cell with ties: every algorithm tied with the best (not significantly
    worse) is 1; the others follow by seed-adjusted accuracy (competition ranking)."""
    ranks = board.groupby(CELL, dropna=False)[ranking_value(board)].rank(ascending=False, method="min")
    if "tied_best" in board:
        tied = board["tied_best"].fillna(False).astype(bool)
        ranks = ranks.where(~tied, 1.0)
    return ranks.astype(int)


def column_label(row: pd.Series) -> str:
    return f"alpha={row['alpha']:g}" if row["partition"] == "dirichlet" else str(row["partition"])


def wide_leaderboard(board: pd.DataFrame) -> pd.DataFrame:
    """Algorithms as rows; per (partition, alpha) the `acc` and the rank with ties; ordered by the
    mean rank over the cells (ties averaged, as the Friedman test ranks), not by a mean of
    accuracies across heterogeneity levels."""
    labelled = board.assign(column=board.apply(column_label, axis=1))
    wide = labelled.pivot_table(index=["algo", "hp"], columns="column", values="acc")
    ranks = labelled.pivot_table(index=["algo", "hp"], columns="column", values="rank")
    average = labelled.assign(avg_rank=labelled.groupby(CELL, dropna=False)[ranking_value(board)].rank(ascending=False))
    mean_rank = average.pivot_table(index=["algo", "hp"], columns="column", values="avg_rank").mean(axis=1)
    out = pd.DataFrame(index=wide.index)
    for column in wide.columns:
        out[column] = wide[column]
        out[f"{column} rank"] = ranks[column]
    out["mean_rank"] = mean_rank
    out = out.sort_values("mean_rank").reset_index().rename_axis(columns=None)
    out.insert(0, "rank", out["mean_rank"].rank(method="min").astype(int))
    return out[[c for c in out.columns if c != "hp"] + ["hp"]]


def ranking_table(board: pd.DataFrame) -> pd.DataFrame:
    """Per protocol (every dataset x partition x alpha run under it): mean ranks, the Friedman
    test and the Nemenyi critical difference over the algorithms that ran in every cell."""
    frames = []
    for protocol, part in board.groupby("protocol"):
        test = rank_test(part)
        if test is None:
            continue
        frames.append(pd.DataFrame({"protocol": protocol, "entry": test.ranks.index, "mean_rank": test.ranks.values,
                                    "cells": test.cells, "friedman_chi2": test.chi2, "friedman_p": test.p_value,
                                    "nemenyi_cd": test.critical_difference}))
    columns = ["protocol", "entry", "mean_rank", "cells", "friedman_chi2", "friedman_p", "nemenyi_cd"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def write_leaderboards(results: Path, board: pd.DataFrame | None = None) -> list[Path]:
    """Rebuild `leaderboard.csv` (long), `leaderboard_<dataset>.csv` (wide) and `ranking.csv` from
    the records (or from `board`, their long leaderboard, when the caller has built it)."""
    results = Path(results)
    board = long_leaderboard(load_runs(results)) if board is None else board
    stale = set(results.glob("leaderboard_*.csv"))
    written = [results / "leaderboard.csv"]
    write_text(written[0], board.to_csv(index=False, float_format="%.4f"))
    for (dataset, protocol), part in board.groupby(["dataset", "protocol"]):
        several = board[board["dataset"] == dataset]["protocol"].nunique() > 1
        name = f"leaderboard_{dataset}_{protocol}.csv" if several else f"leaderboard_{dataset}.csv"
        path = results / name
        write_text(path, wide_leaderboard(part).to_csv(index=False, float_format="%.4f"))
        written.append(path)
    written.append(results / "ranking.csv")
    write_text(written[-1], ranking_table(board).to_csv(index=False, float_format="%.4f"))
    for path in stale - set(written):  # a protocol whose runs are gone leaves no table behind
        path.unlink(missing_ok=True)
    return written

"""Across cells (every dataset x partition x alpha of one protocol): which algorithm is better in
general, from the cells' own results (:mod:`pflbench.analysis.statistics`).

- Mean ranks (ties averaged) of the seed-adjusted accuracy (`acc_adj`), the Friedman test
  (scipy.stats.friedmanchisquare) on the algorithms present in every cell, and the Nemenyi
  post-hoc test (scikit-posthocs) with its critical difference (Demsar 2006).
- How often does A beat B? Per cell every pair is tested on its shared seeds (Holm over the
  cell's pairs); the win/tie/loss counts add the cells up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from pflbench.analysis.statistics import (CELL, ENTRY, SIGNIFICANCE, Counts, entry_labels, holm, paired_p_value,
                                          pooled)


def nemenyi_critical_difference(k: int, n: int, alpha: float = SIGNIFICANCE) -> float:
    """Demsar (2006): CD = q_alpha * sqrt(k (k + 1) / (6 N)), q_alpha the studentized range
    quantile for k groups and infinite degrees of freedom, divided by sqrt(2)."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


def friedman_from_mean_ranks(ranks: list[float], n: int) -> tuple[float, float]:
    """Friedman's chi-square and the Iman-Davenport F from mean ranks over n blocks (no tie
    correction): the formulas of Demsar (2006), section 3.2.2."""
    k = len(ranks)
    chi2 = 12.0 * n / (k * (k + 1)) * (sum(r * r for r in ranks) - k * (k + 1) ** 2 / 4.0)
    return chi2, (n - 1) * chi2 / (n * (k - 1) - chi2)


@dataclass
class RankTest:
    """Mean ranks over the cells where every listed entry ran, and the tests on them."""

    ranks: pd.Series  # mean rank per entry, best (lowest) first
    cells: int
    chi2: float
    p_value: float
    critical_difference: float
    posthoc: pd.DataFrame  # Nemenyi p-values, entries x entries


def ranking_value(board: pd.DataFrame) -> str:
    """The column entries are ranked by: the seed-adjusted accuracy where the board has it."""
    return "acc_adj" if "acc_adj" in board else "acc"


def rank_test(board: pd.DataFrame, value: str | None = None) -> RankTest | None:
    """Friedman and Nemenyi over complete blocks: the entries that ran in every cell (an entry
    missing from some cell, such as an algorithm added later, is left out rather than dropping
    the cells); None when there are fewer than 2 cells or fewer than 3 such entries."""
    import scikit_posthocs

    value = value or ranking_value(board)
    per_cell = board.assign(entry=entry_labels(board)).pivot_table(index=CELL, columns="entry", values=value)
    complete = per_cell.dropna(axis=1)
    if complete.shape[0] < 2 or complete.shape[1] < 3:
        return None
    ranks = complete.rank(axis=1, ascending=False, method="average").mean().sort_values()
    if (complete.nunique(axis=1) == 1).all():  # every cell a complete tie: nothing to test
        chi2, p_value = 0.0, 1.0
    else:
        chi2, p_value = stats.friedmanchisquare(*complete.to_numpy().T)
    posthoc = scikit_posthocs.posthoc_nemenyi_friedman(complete.to_numpy())
    posthoc.index = posthoc.columns = complete.columns
    return RankTest(ranks=ranks, cells=complete.shape[0], chi2=float(chi2), p_value=float(p_value),
                    critical_difference=nemenyi_critical_difference(complete.shape[1], complete.shape[0]),
                    posthoc=posthoc.loc[ranks.index, ranks.index])


def pairwise_outcomes(rows: pd.DataFrame, labels: dict[tuple[str, str], str]) -> pd.DataFrame:
    """Every pair of entries in one cell, tested on their shared seeds: one row per ordered pair
    (`entry`, `other`) with `outcome` +1 (entry significantly better, Holm-corrected over the
    cell's pairs), -1 (significantly worse) or 0 (tie)."""
    entries = {key: part for key, part in rows.groupby(ENTRY, sort=True)}
    keys = list(entries)
    pairs, p_values, signs = [], [], []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            shared = sorted(set(entries[a]["seed"]) & set(entries[b]["seed"]))
            if not shared:
                continue
            ca, cb = Counts.of(entries[a], shared), Counts.of(entries[b], shared)
            pairs.append((a, b))
            p_values.append(paired_p_value(ca, cb))
            signs.append(np.sign(pooled(ca.n, ca.correct) - pooled(cb.n, cb.correct)))
    out = []
    for (a, b), p, sign in zip(pairs, holm(p_values), signs):
        outcome = int(sign) if p < SIGNIFICANCE else 0
        out.append({"entry": labels[a], "other": labels[b], "outcome": outcome})
        out.append({"entry": labels[b], "other": labels[a], "outcome": -outcome})
    return pd.DataFrame(out, columns=["entry", "other", "outcome"])


def win_tie_loss(rows: pd.DataFrame) -> pd.DataFrame:
    """Over every cell of `rows` (per-client counts, as `final_clients` gives): for each ordered
    pair of entries, the cells where the row entry is significantly better (`wins`), worse
    (`losses`) or neither (`ties`)."""
    labels = dict(zip(zip(rows["algo"], rows["hp"]), entry_labels(rows)))
    frames = [pairwise_outcomes(part, labels) for _, part in rows.groupby(CELL, sort=True, dropna=False)]
    outcomes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["entry", "other", "outcome"])
    grouped = outcomes.groupby(["entry", "other"])["outcome"]
    return pd.DataFrame({"wins": grouped.apply(lambda o: int((o > 0).sum())),
                         "ties": grouped.apply(lambda o: int((o == 0).sum())),
                         "losses": grouped.apply(lambda o: int((o < 0).sum()))}).reset_index()

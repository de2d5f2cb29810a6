"""Uncertainty and significance for the leaderboard: intervals, paired tests, ranks.

Runs of different algorithms with the same seed share the partition, the initial model and the
sampled clients, and every client's test set is the same across algorithms, so results are
paired by seed and by client. Every figure here is computed from the per-client counts of the
final evaluation (`clients.csv`: n_test, correct), never from the rounded summaries.

Which question each figure answers:

- How precise is one algorithm's accuracy? `acc_ci_low`/`acc_ci_high`: a 95% percentile interval
  from a hierarchical bootstrap (resample the seeds, then the clients within each drawn seed, and
  recompute the seed-averaged pooled accuracy). With one seed the interval still reflects the
  clients; with several it adds the seed-to-seed (training) variation. scipy.stats.bootstrap
  resamples one level only, so the two-level resampling is done here with numpy, seeded.
- Does A differ from B in one cell? The paired difference of their seed-averaged pooled accuracies,
  its interval from the same hierarchical bootstrap applied to both at once (the same seeds and
  clients drawn for both), and a p-value from a paired permutation test
  (scipy.stats.permutation_test, swapping A's and B's correct counts within each (seed, client)
  pair). p-values are Holm-corrected (statsmodels) within each family of a cell: each algorithm
  against the cell's best, against FedAvg, against Local.
- Which algorithms are indistinguishable from the best? `tied_best`: the best and every algorithm
  whose Holm-corrected p-value against it is at least 0.05.
- Which is the best, and in what order, when entries ran different seeds (a grid filled over
  time, or more seeds for one method)? Seeds differ in difficulty (the partition and the clients
  sampled change with the seed), so a plain mean favours an entry whose extra seed is an easy one.
  `acc_adj` is each entry's least-squares mean under the additive model acc[entry, seed] =
  entry effect + seed effect (the two-way model without interaction of a block design with
  missing cells; Searle, Speed and Milliken 1980's population marginal means), fitted to the
  per-seed pooled accuracies by numpy's least squares: the accuracy the entry would average over
  all the cell's seeds. Where every entry ran the same seeds it is exactly `acc`; where the seeds
  do not connect the entries (no chain of shared seeds) the effects are not estimable and it is
  `acc`. The best, the ranks and the Friedman test use `acc_adj`.
- Across many cells: :mod:`pflbench.analysis.ranking`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

CELL = ["dataset", "partition", "alpha", "protocol"]
ENTRY = ["algo", "hp"]
LEVEL = 0.95
SIGNIFICANCE = 0.05
RESAMPLES = 4000
PERMUTATIONS = 9999
DIGITS = 9  # decimals (of a percentage) that seed-adjusted accuracies keep
SEED = 20260  # fixed: the same records always give the same intervals and p-values


# -- per-client counts ------------------------------------------------------------------------------
def final_clients(runs: pd.DataFrame, suffix: str = "", newcomers: bool = False) -> pd.DataFrame:
    """One row per (run, client) at the run's final evaluation: the cell, the entry, the seed, the
    client, `n` (test samples) and `correct` (`correct_ft` when suffix="_ft"; runs without it are
    left out). The clients that trained, as in `acc`; with `newcomers`, the holdout clients
    instead (they never trained: `acc_new`), and runs without any are left out."""
    frames = []
    for run in runs.itertuples():
        clients = pd.read_csv(Path(run.run_dir) / "clients.csv")
        column = f"correct{suffix}"
        if column not in clients:
            continue
        last = clients[clients["round"] == clients["round"].max()]
        held = last["holdout"].astype(bool) if "holdout" in last else pd.Series(False, index=last.index)
        last = last[held] if newcomers else last[~held]
        if last.empty:
            continue
        frames.append(pd.DataFrame({
            **{key: getattr(run, key) for key in (*CELL, *ENTRY, "seed")},
            "client": last["client"].to_numpy(), "n": last["n_test"].to_numpy(),
            "correct": last[column].to_numpy()}))
    columns = [*CELL, *ENTRY, "seed", "client", "n", "correct"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


@dataclass
class Counts:
    """One entry's counts as (seeds x clients) arrays, seeds and clients in sorted order."""

    seeds: list[int]
    n: np.ndarray
    correct: np.ndarray

    @classmethod
    def of(cls, rows: pd.DataFrame, seeds: list[int] | None = None) -> "Counts":
        seeds = sorted(rows["seed"].unique().tolist()) if seeds is None else seeds
        rows = rows[rows["seed"].isin(seeds)]
        n = rows.pivot(index="seed", columns="client", values="n").loc[seeds]
        correct = rows.pivot(index="seed", columns="client", values="correct").loc[seeds]
        return cls(seeds, n.to_numpy(np.float64), correct.to_numpy(np.float64))


def pooled(n: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Seed-averaged pooled accuracy (%) over the last two axes (seeds, clients)."""
    return 100.0 * (correct.sum(-1) / n.sum(-1)).mean(-1)


def client_mean(n: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Seed-averaged mean of per-client accuracies (%)."""
    return 100.0 * (correct / n).mean(-1).mean(-1)


STATISTICS = {"pooled": pooled, "client_mean": client_mean}


def resample_indices(seeds: int, clients: int, resamples: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical bootstrap draws: seed indices (B, S) and, per drawn seed, client indices
    (B, S, C). The same draws applied to several entries make their resamples paired."""
    seed_idx = rng.integers(seeds, size=(resamples, seeds))
    client_idx = rng.integers(clients, size=(resamples, seeds, clients))
    return seed_idx, client_idx


def resampled(values: np.ndarray, seed_idx: np.ndarray, client_idx: np.ndarray) -> np.ndarray:
    return values[seed_idx[..., None], client_idx]


def interval(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(counts: Counts, statistic: str = "pooled", resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of one entry's statistic by the hierarchical bootstrap."""
    fn = STATISTICS[statistic]
    rng = np.random.default_rng(seed)
    s_idx, c_idx = resample_indices(*counts.n.shape, resamples, rng)
    return interval(fn(resampled(counts.n, s_idx, c_idx), resampled(counts.correct, s_idx, c_idx)))


@dataclass
class PairedDifference:
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    seeds: int
    seed_wins: int
    client_wins: float
    client_ties: float


def paired_difference(a: Counts, b: Counts, resamples: int = RESAMPLES, permutations: int = PERMUTATIONS,
                      seed: int = SEED) -> PairedDifference:
    """A minus B on the same seeds and clients: difference of seed-averaged pooled accuracy, its
    paired hierarchical-bootstrap interval, the paired permutation p-value (two-sided), how many
    seeds A wins, and the share of (seed, client) pairs on which A is more accurate (and tied)."""
    if a.seeds != b.seeds or a.n.shape != b.n.shape or not np.array_equal(a.n, b.n):
        raise ValueError("paired comparison needs the same seeds, clients and test sets")
    rng = np.random.default_rng(seed)
    s_idx, c_idx = resample_indices(*a.n.shape, resamples, rng)
    n = resampled(a.n, s_idx, c_idx)
    draws = pooled(n, resampled(a.correct, s_idx, c_idx)) - pooled(n, resampled(b.correct, s_idx, c_idx))
    diff = float(pooled(a.n, a.correct) - pooled(b.n, b.correct))
    low, high = interval(draws)
    # pooled difference = sum over pairs of w * (correct_A - correct_B), w = 100 / (S * n of its seed)
    p_value = paired_p_value(a, b, permutations, seed)
    per_seed = 100.0 * (a.correct.sum(1) / a.n.sum(1) - b.correct.sum(1) / b.n.sum(1))
    acc_a, acc_b = a.correct / a.n, b.correct / b.n
    return PairedDifference(diff=diff, ci_low=low, ci_high=high, p_value=p_value, seeds=len(a.seeds),
                            seed_wins=int((per_seed > 0).sum()),
                            client_wins=float((acc_a > acc_b).mean()), client_ties=float((acc_a == acc_b).mean()))


def paired_p_value(a: Counts, b: Counts, permutations: int = PERMUTATIONS, seed: int = SEED) -> float:
    """Two-sided p-value of a paired permutation test of A's and B's seed-averaged pooled accuracy:
    under the null, A's and B's correct counts are exchangeable within each (seed, client) pair
    (scipy.stats.permutation_test; exact when there are few pairs). Identical results give 1."""
    # pooled difference = sum over pairs of w * (correct_A - correct_B), w = 100 / (S * n of its seed)
    weights = (100.0 / (a.n.shape[0] * a.n.sum(1, keepdims=True)) * np.ones_like(a.n)).ravel()
    x, y = a.correct.ravel(), b.correct.ravel()
    if np.array_equal(x, y):
        return 1.0
    test = stats.permutation_test(
        (x, y), lambda u, v, axis: (weights * (u - v)).sum(axis=axis), vectorized=True,
        permutation_type="samples", n_resamples=permutations, alternative="two-sided",
        rng=np.random.default_rng(seed))
    return float(test.pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels), in the given order."""
    if not p_values:
        return []
    return multipletests(p_values, method="holm")[1].tolist()


def per_seed_pooled(counts: Counts) -> np.ndarray:
    """Pooled accuracy (%) of each of the entry's seeds."""
    return 100.0 * counts.correct.sum(1) / counts.n.sum(1)


def seed_adjusted_means(entries: dict[tuple[str, str], Counts]) -> dict[tuple[str, str], float]:
    """Least-squares means of the additive model acc[e, s] = a_e + b_s over the observed (entry,
    seed) pairs, averaged over the cell's seeds (see the module docstring). The plain seed means
    where every entry ran the same seeds, or where the design is not connected. Rounded to 1e-9
    points, far below the smallest real difference (one test sample), so that entries whose
    accuracies are equal stay tied instead of being ordered by float rounding."""
    plain = {key: round(float(per_seed_pooled(c).mean()), DIGITS) for key, c in entries.items()}
    seed_sets = {tuple(c.seeds) for c in entries.values()}
    if len(seed_sets) <= 1:
        return plain
    keys = list(entries)
    seeds = sorted({seed for c in entries.values() for seed in c.seeds})
    rows, y = [], []
    for e, key in enumerate(keys):
        for seed, acc in zip(entries[key].seeds, per_seed_pooled(entries[key])):
            row = np.zeros(len(keys) + len(seeds) - 1)
            row[e] = 1.0
            if seed != seeds[0]:  # the first seed is the reference level: b = 0
                row[len(keys) + seeds.index(seed) - 1] = 1.0
            rows.append(row)
            y.append(acc)
    design = np.array(rows)
    if np.linalg.matrix_rank(design) < design.shape[1]:  # not connected: effects not estimable
        return plain
    coef = np.linalg.lstsq(design, np.array(y), rcond=None)[0]
    seed_effect = np.concatenate([[0.0], coef[len(keys):]]).mean()
    return {key: round(float(coef[e] + seed_effect), DIGITS) for e, key in enumerate(keys)}


# -- one cell ---------------------------------------------------------------------------------------
def entry_label(algo: str, hp: str) -> str:
    return algo if not hp else f"{algo}[{hp}]"


def entry_labels(frame: pd.DataFrame, within: list[str] | None = None) -> pd.Series:
    """A name per row: the algorithm, or `algo[hyperparameters]` where the frame (with `within`
    columns, each group of them: a cell) holds the same algorithm with several hyperparameter
    settings."""
    several = frame.groupby([*(within or []), "algo"], dropna=False)["hp"].transform("nunique") > 1
    return pd.Series([entry_label(a, h) if s else a for a, h, s in zip(frame["algo"], frame["hp"], several)],
                     index=frame.index)


def cell_statistics(rows: pd.DataFrame) -> pd.DataFrame:
    """Per entry of one cell: intervals, and paired comparisons with the best, FedAvg and Local."""
    entries = {key: Counts.of(part) for key, part in rows.groupby(ENTRY, sort=True)}
    out: dict[tuple[str, str], dict] = {key: {} for key in entries}
    for key, counts in entries.items():
        low, high = bootstrap_interval(counts)
        c_low, c_high = bootstrap_interval(counts, "client_mean")
        out[key].update(acc_ci_low=low, acc_ci_high=high, acc_client_mean_ci_low=c_low,
                        acc_client_mean_ci_high=c_high)
    means = seed_adjusted_means(entries)
    for key, mean in means.items():
        out[key]["acc_adj"] = mean
    best = max(means, key=lambda k: (means[k], k))
    references = {"best": best}
    for algo in ("fedavg", "local"):
        found = sorted(k for k in entries if k[0] == algo)
        if found:
            references[algo] = found[0]
    for name, ref in references.items():
        keys = [k for k in entries if k != ref]
        results = []
        for key in keys:
            shared = sorted(set(entries[key].seeds) & set(entries[ref].seeds))
            if not shared:
                results.append(None)
                continue
            results.append(paired_difference(Counts.of(rows[_is(rows, key)], shared),
                                             Counts.of(rows[_is(rows, ref)], shared)))
        tested = [r for r in results if r is not None]
        adjusted = iter(holm([r.p_value for r in tested]))
        for key, result in zip(keys, results):
            if result is None:
                continue
            out[key].update({f"diff_vs_{name}": result.diff, f"diff_vs_{name}_ci_low": result.ci_low,
                             f"diff_vs_{name}_ci_high": result.ci_high, f"p_vs_{name}": next(adjusted)})
        out[ref].update({f"diff_vs_{name}": 0.0, f"p_vs_{name}": 1.0})
    for key in entries:
        out[key]["tied_best"] = key == best or out[key].get("p_vs_best", 0.0) >= SIGNIFICANCE
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=ENTRY)
    frame["best_entry"] = dict(zip(zip(rows["algo"], rows["hp"]), entry_labels(rows)))[best]
    return frame.reset_index()


def _is(rows: pd.DataFrame, key: tuple[str, str]) -> pd.Series:
    return (rows["algo"] == key[0]) & (rows["hp"] == key[1])


def leaderboard_statistics(runs: pd.DataFrame) -> pd.DataFrame:
    """`cell_statistics` for every cell of the ok runs, plus intervals for `acc_ft`, and for the
    newcomers' `acc_new` and `acc_new_ft` (holdout clients), where present."""
    ok = runs[runs["status"] == "ok"] if len(runs) else runs
    if ok.empty:
        return pd.DataFrame(columns=[*CELL, *ENTRY])
    rows = final_clients(ok)
    frames = []
    for cell, part in rows.groupby(CELL, sort=True, dropna=False):
        frames.append(cell_statistics(part).assign(**dict(zip(CELL, cell))))
    board = pd.concat(frames, ignore_index=True)
    for metric, suffix, newcomers in (("acc_ft", "_ft", False), ("acc_new", "", True), ("acc_new_ft", "_ft", True)):
        rows = final_clients(ok, suffix, newcomers)
        if not len(rows):
            continue
        intervals = [{**dict(zip([*CELL, *ENTRY], key)),
                      **dict(zip((f"{metric}_ci_low", f"{metric}_ci_high"), bootstrap_interval(Counts.of(part))))}
                     for key, part in rows.groupby([*CELL, *ENTRY], sort=True, dropna=False)]
        board = board.merge(pd.DataFrame(intervals), how="left", on=[*CELL, *ENTRY])
    return board


# -- two algorithms, cell by cell -------------------------------------------------------------------
FINE_TUNED = ":ft"  # `fedavg:ft` names FedAvg's accuracy after the run's --finetune-epochs (acc_ft)


def with_fine_tuned(rows: pd.DataFrame, fine_tuned: pd.DataFrame) -> pd.DataFrame:
    """`rows` (as `final_clients` gives them) and `fine_tuned` (`final_clients(runs, "_ft")`), the
    latter as entries of their own, named `algo:ft` by `compare`. The two come from the same runs,
    so `compare` pairs a global method's fine-tuned model with a personalized method (FedAvg-FT
    against FedPer) or with its own model before fine-tuning, seed by seed and client by client."""
    return pd.concat([rows.assign(after=""), fine_tuned.assign(after=FINE_TUNED)], ignore_index=True)


def compare(rows: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """A minus B in every cell of `rows` (per-client counts) where both ran, paired on their
    shared seeds: accuracies, difference, 95% interval, p-value (and Holm-adjusted over the
    cells listed), seeds won, and the shares of (seed, client) pairs A wins and ties. `a` and `b`
    name entries as `entry_labels` does within each cell (the algorithm, or `algo[hp]` where it
    ran with several hyperparameter settings in that cell; `algo[hp]` always works), followed by
    `:ft` for the rows `with_fine_tuned` added: `fedobp` is FedOBP at its defaults in the untuned
    cells and `fedobp[tuned]` in the tuned ones. Raises ValueError naming what is wrong."""
    rows = rows.reset_index(drop=True)
    after = rows["after"] if "after" in rows else ""
    rows = rows.assign(short=entry_labels(rows, within=CELL) + after,
                       full=pd.Series(map(entry_label, rows["algo"], rows["hp"]), index=rows.index) + after)
    known = sorted(set(rows["short"]) | set(rows["full"]))
    for name in (a, b):
        if name not in known:
            hint = " (':ft' needs runs trained with --finetune-epochs)" if name.endswith(FINE_TUNED) else ""
            raise ValueError(f"no runs of '{name}' in these results{hint}; they hold: {', '.join(known)}")
    if a == b:
        raise ValueError("compare two different algorithms")
    out = []
    for cell, part in rows.groupby(CELL, sort=True, dropna=False):
        pa, pb = (part[(part["short"] == name) | (part["full"] == name)] for name in (a, b))
        shared = sorted(set(pa["seed"]) & set(pb["seed"]))
        if not shared:
            continue
        ca, cb = Counts.of(pa, shared), Counts.of(pb, shared)
        result = paired_difference(ca, cb)
        out.append({**dict(zip(CELL, cell)), "seeds": result.seeds,
                    f"acc_{a}": float(pooled(ca.n, ca.correct)), f"acc_{b}": float(pooled(cb.n, cb.correct)),
                    "diff": result.diff, "ci_low": result.ci_low, "ci_high": result.ci_high,
                    "p_value": result.p_value, "seed_wins": f"{result.seed_wins}/{result.seeds}",
                    "client_wins_pct": 100.0 * result.client_wins, "client_ties_pct": 100.0 * result.client_ties})
    if not out:
        raise ValueError(f"'{a}' and '{b}' share no cell (dataset, partition, alpha, protocol) with a common seed")
    table = pd.DataFrame(out)
    table.insert(table.columns.get_loc("p_value") + 1, "p_holm", holm(table["p_value"].tolist()))
    return table

"""Intervals, paired tests and ranks on synthetic per-client counts whose truth is known, and the
Friedman / Nemenyi arithmetic against Demsar (2006)'s worked example."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pflbench.analysis.ranking import friedman_from_mean_ranks, nemenyi_critical_difference, rank_test, win_tie_loss
from pflbench.analysis.statistics import (Counts, bootstrap_interval, cell_statistics, paired_difference,
                                          seed_adjusted_means)

CELL = {"dataset": "toy", "partition": "dirichlet", "alpha": 0.1, "protocol": "p"}


def rows(algo, correct, n, hp="", seeds=None):
    """Per-client rows of one entry: `correct` and `n` are (seeds x clients) arrays; the seeds are
    40, 41, ... unless given."""
    correct, n = np.asarray(correct), np.asarray(n)
    seeds = list(range(40, 40 + correct.shape[0])) if seeds is None else seeds
    out = []
    for s in range(correct.shape[0]):
        for c in range(correct.shape[1]):
            out.append({**CELL, "algo": algo, "hp": hp, "seed": seeds[s], "client": c,
                        "n": int(n[s, c]), "correct": int(correct[s, c])})
    return pd.DataFrame(out)


def toy_counts(seeds=3, clients=30, seed=0):
    gen = np.random.default_rng(seed)
    n = gen.integers(20, 60, size=(seeds, clients))
    correct = np.floor(n * gen.uniform(0.5, 0.9, size=n.shape)).astype(int)
    return n, correct


def test_an_algorithm_better_on_every_client_of_every_seed_is_significant_and_first():
    n, base = toy_counts()
    better = np.minimum(base + 3, n)
    assert (better > base).all()
    table = cell_statistics(pd.concat([rows("b", base, n), rows("a", better, n), rows("c", base, n)])).set_index("algo")
    assert table.loc["a", "tied_best"] and table["best_entry"].iloc[0] == "a"
    assert table.loc["b", "p_vs_best"] < 0.01 and not table.loc["b", "tied_best"]
    assert table.loc["b", "diff_vs_best"] < 0 and table.loc["b", "diff_vs_best_ci_high"] < 0


def test_two_identical_algorithms_are_tied_with_p_one_and_identical_intervals():
    n, correct = toy_counts()
    table = cell_statistics(pd.concat([rows("a", correct, n), rows("b", correct, n)])).set_index("algo")
    assert table.loc["b", "p_vs_best"] == 1.0 and table.loc["b", "diff_vs_best"] == 0.0
    assert table.loc["a", "tied_best"] and table.loc["b", "tied_best"]
    for column in ("acc_ci_low", "acc_ci_high", "acc_client_mean_ci_low", "acc_client_mean_ci_high"):
        assert table.loc["a", column] == table.loc["b", column]


def test_one_seed_still_has_an_interval_from_its_clients():
    n, correct = toy_counts(seeds=1)
    counts = Counts.of(rows("a", correct, n))
    acc = 100.0 * correct.sum() / n.sum()
    low, high = bootstrap_interval(counts)
    assert low < acc < high and high - low > 1.0


def test_the_bootstrap_and_the_permutation_test_are_seeded():
    n, correct = toy_counts()
    other = np.minimum(correct + np.random.default_rng(1).integers(-2, 3, size=n.shape).clip(0), n)
    a, b = Counts.of(rows("a", correct, n)), Counts.of(rows("b", other, n))
    assert paired_difference(a, b) == paired_difference(a, b)
    assert bootstrap_interval(a) == bootstrap_interval(a)


def test_paired_difference_counts_seed_wins_and_client_shares_exactly():
    n = np.full((2, 4), 10)
    a = np.array([[9, 9, 5, 5], [5, 5, 5, 5]])
    b = np.array([[8, 9, 6, 5], [6, 6, 6, 6]])
    result = paired_difference(Counts.of(rows("a", a, n)), Counts.of(rows("b", b, n)))
    assert result.diff == pytest.approx(100 * ((28 - 28) / 40 + (20 - 24) / 40) / 2)
    assert result.seed_wins == 0  # seed 0 ties (28 = 28), seed 1 is B's
    assert result.client_wins == 1 / 8 and result.client_ties == 2 / 8


def test_nemenyi_critical_values_match_demsar_table_5a():
    # Demsar (2006), Table 5(a): q_0.05 for the two-tailed Nemenyi test, k = 2..10 classifiers
    printed = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), printed):
        cd_one_block = nemenyi_critical_difference(k, 1) / np.sqrt(k * (k + 1) / 6.0)
        assert abs(cd_one_block - q) <= 0.001  # the table's last digit is truncated in places


def test_friedman_and_critical_difference_match_demsars_worked_example():
    # Demsar (2006), section 3.2.2: four C4.5 variants on 14 data sets, mean ranks 3.143, 2.000,
    # 2.893, 1.964: chi2_F = 9.28, F_F = 3.69; Nemenyi CD at 0.05 = 1.25 (and 1.12 at 0.10)
    chi2, f = friedman_from_mean_ranks([3.143, 2.000, 2.893, 1.964], 14)
    assert round(chi2, 2) == 9.28 and round(f, 2) == 3.69
    assert round(nemenyi_critical_difference(4, 14), 2) == 1.25
    assert round(nemenyi_critical_difference(4, 14, alpha=0.10), 2) == 1.12


def test_scipys_friedman_agrees_with_the_mean_rank_formula_without_ties():
    gen = np.random.default_rng(3)
    scores = gen.permuted(np.tile(np.arange(5.0), (9, 1)), axis=1) + gen.uniform(0, 0.1, (9, 5))
    ranks = stats.rankdata(-scores, axis=1).mean(0)
    assert stats.friedmanchisquare(*scores.T).statistic == pytest.approx(friedman_from_mean_ranks(list(ranks), 9)[0])


def board(cells):
    """A long leaderboard of `acc` per (cell, algo): `cells` is a list of {algo: acc}."""
    out = []
    for i, accs in enumerate(cells):
        out += [{**CELL, "alpha": 0.1 * (i + 1), "algo": algo, "hp": "", "acc": acc} for algo, acc in accs.items()]
    return pd.DataFrame(out)


def test_rank_test_orders_by_mean_rank_over_complete_cells():
    cells = [{"a": 90, "b": 80, "c": 70, "d": 60}, {"a": 91, "b": 79, "c": 72, "d": 61},
             {"a": 85, "b": 86, "c": 70, "d": 60}, {"a": 95, "b": 80, "c": 75}]  # d misses the last cell
    result = rank_test(board(cells))
    # d did not run everywhere, so the test keeps every cell and leaves d out
    assert result.cells == 4 and list(result.ranks.index) == ["a", "b", "c"]
    assert result.ranks["a"] == pytest.approx((1 + 1 + 2 + 1) / 4)
    assert result.posthoc.shape == (3, 3)
    assert rank_test(board(cells[:1])) is None


def test_win_tie_loss_counts_significant_cells_only():
    n, base = toy_counts()
    better = np.minimum(base + 4, n)
    two_cells = pd.concat([rows("a", better, n), rows("b", base, n),
                           rows("a", base, n).assign(alpha=0.5), rows("b", base, n).assign(alpha=0.5)])
    table = win_tie_loss(two_cells).set_index(["entry", "other"])
    assert table.loc[("a", "b")].tolist() == [1, 1, 0]
    assert table.loc[("b", "a")].tolist() == [0, 1, 1]


def test_compare_pairs_shared_seeds_per_cell_and_refuses_cells_it_cannot_pair():
    from pflbench.analysis.statistics import compare

    n, base = toy_counts()
    better = np.minimum(base + 2, n)
    table = compare(pd.concat([rows("a", better, n), rows("b", base, n)]), "a", "b")
    assert len(table) == 1 and table["seed_wins"].iloc[0] == "3/3"
    assert table["diff"].iloc[0] > 0 and table["p_value"].iloc[0] < 0.01
    assert table["client_wins_pct"].iloc[0] == pytest.approx(100.0 * (better / n > base / n).mean())
    apart = pd.concat([rows("a", better, n), rows("b", base, n).assign(alpha=0.5)])
    with pytest.raises(ValueError, match="share no cell"):
        compare(apart, "a", "b")


def test_compare_takes_an_entrys_fine_tuned_counts_by_its_ft_name():
    from pflbench.analysis.statistics import compare, with_fine_tuned

    n, base = toy_counts()
    tuned = np.minimum(base + 4, n)
    plain = pd.concat([rows("fedavg", base, n), rows("fedper", base, n)])
    both = with_fine_tuned(plain, rows("fedavg", tuned, n))
    gain = compare(both, "fedavg:ft", "fedavg").iloc[0]
    assert gain["diff"] == pytest.approx(100.0 * (tuned.sum(1) - base.sum(1)).dot(1.0 / n.sum(1)) / 3)
    assert gain["acc_fedavg"] == pytest.approx(compare(plain, "fedavg", "fedper").iloc[0]["acc_fedavg"])
    # the same counts under another name: a tie, exactly
    same = compare(with_fine_tuned(plain, rows("fedavg", base, n)), "fedavg:ft", "fedper").iloc[0]
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="needs runs trained with --finetune-epochs"):
        compare(both, "fedper:ft", "fedavg")


def test_figure_rows_say_their_seed_count_only_where_a_cell_mixes_counts():
    from pflbench.analysis.report import labels_with_seeds

    mixed = pd.DataFrame({"algo": ["fedavg", "fedper", "local"], "hp": ["", "", ""], "seeds": [3, 1, 2]})
    assert labels_with_seeds(mixed) == ["fedavg (3 seeds)", "fedper (1 seed)", "local (2 seeds)"]
    even = mixed.assign(seeds=3)
    assert labels_with_seeds(even) == ["fedavg", "fedper", "local"]


def spread(totals, clients=10):
    """(seeds x clients) correct counts with the given total per seed, spread evenly over clients."""
    return np.array([[total // clients + (c < total % clients) for c in range(clients)] for total in totals])


def test_a_cell_with_equal_seeds_adjusts_nothing():
    n, correct = toy_counts()
    other = np.minimum(correct + 2, n)
    table = cell_statistics(pd.concat([rows("a", correct, n), rows("b", other, n)])).set_index("algo")
    for algo, counts in (("a", correct), ("b", other)):
        assert table.loc[algo, "acc_adj"] == round(float((100.0 * counts.sum(1) / n.sum(1)).mean()), 9)
    # equal accuracies from different per-seed values stay exactly tied (no float-rounding order)
    n2 = np.full((3, 10), 7)  # 70 tests a seed: per-seed accuracies 100 * k / 70 are not exact in floats
    x, y = spread([20, 20, 27]), spread([27, 20, 20])
    assert (100.0 * x.sum(1) / 70).mean() != (100.0 * y.sum(1) / 70).mean()  # unrounded, they would differ
    table = cell_statistics(pd.concat([rows("x", x, n2), rows("y", y, n2)])).set_index("algo")
    assert table.loc["x", "acc_adj"] == table.loc["y", "acc_adj"] and table.loc["y", "tied_best"]


def test_seed_adjusted_accuracy_recovers_an_additive_truth_the_plain_mean_gets_wrong():
    # per-seed accuracy = entry effect + seed effect exactly: seed 41 is 20 points easier than 40;
    # on seed 40, a 60, b 55, c 50. a ran only seed 40, so its plain mean (60) sits below b's (65).
    n1, n2 = np.full((1, 10), 10), np.full((2, 10), 10)
    records = pd.concat([rows("a", spread([60]), n1, seeds=[40]),
                         rows("b", spread([55, 75]), n2, seeds=[40, 41]),
                         rows("c", spread([50, 70]), n2, seeds=[40, 41])])
    table = cell_statistics(records).set_index("algo")
    assert table["acc_adj"].to_dict() == pytest.approx({"a": 70.0, "b": 65.0, "c": 60.0}, abs=1e-9)
    assert table["best_entry"].iloc[0] == "a"  # the plain means would have made it b
    assert table.loc["b", "diff_vs_best"] == pytest.approx(-5.0)  # paired on the shared seed 40
    entries = {("a", ""): Counts.of(rows("a", spread([60]), n1, seeds=[40])),
               ("b", ""): Counts.of(rows("b", spread([75]), n1, seeds=[41]))}
    # no shared seed connects a and b: nothing to estimate the seed effect from, plain means
    assert seed_adjusted_means(entries) == {("a", ""): 60.0, ("b", ""): 75.0}


def test_cell_ranks_follow_the_seed_adjusted_accuracy():
    from pflbench.analysis.leaderboard import cell_ranks

    board = pd.DataFrame([{**CELL, "algo": a, "hp": "", "acc": acc, "acc_adj": adj, "tied_best": False}
                          for a, acc, adj in (("a", 60.0, 70.0), ("b", 65.0, 65.0), ("c", 60.0, 60.0))])
    assert cell_ranks(board).tolist() == [1, 2, 3]
    assert cell_ranks(board.drop(columns="acc_adj")).tolist() == [2, 1, 2]


def test_compare_names_an_algorithm_by_its_bare_name_in_every_cell_where_it_has_one_setting():
    from pflbench.analysis.statistics import compare

    n, base = toy_counts()
    better = np.minimum(base + 2, n)
    default = pd.concat([rows("a", better, n, hp="q=1"), rows("b", base, n)])
    tuned = pd.concat([rows("a", base, n, hp="tuned"), rows("b", better, n, hp="tuned")]).assign(protocol="p-tuned8")
    table = compare(pd.concat([default, tuned]), "a", "b").set_index("protocol")
    assert list(table.index) == ["p", "p-tuned8"]  # untuned against untuned, tuned against tuned
    assert table.loc["p", "diff"] > 0 > table.loc["p-tuned8", "diff"]
    only_tuned = compare(pd.concat([default, tuned]), "a[tuned]", "b")
    assert list(only_tuned["protocol"]) == ["p-tuned8"]
    assert only_tuned["diff"].iloc[0] == table.loc["p-tuned8", "diff"]
    # two settings of `a` in one cell: the bare name is ambiguous there, the full names are not
    two = pd.concat([default, rows("a", base, n, hp="q=2")])
    with pytest.raises(ValueError, match=r"no runs of 'a' .*they hold: a\[q=1\], a\[q=2\], b"):
        compare(two, "a", "b")
    assert compare(two, "a[q=2]", "b")["diff"].iloc[0] == 0.0

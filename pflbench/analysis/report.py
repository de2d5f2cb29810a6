"""Plots and a one-page report from stored runs (seaborn PNGs and `reports/README.md`).

Everything is rebuilt from the run records and leaderboards, so `pflbench report` needs no
training. Figures are written atomically like every other output.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from pflbench.atomic import atomic_path, write_text  # noqa: E402
from pflbench.analysis.leaderboard import (LATER_PROTOCOL_KEYS, SKEW_METRICS, load_runs, long_leaderboard,  # noqa: E402
                                           wide_leaderboard, write_leaderboards)
from pflbench.analysis.tuning_report import tuning_section  # noqa: E402
from pflbench.core.schemes import ALPHA_SCHEMES  # noqa: E402
from pflbench.analysis.ranking import rank_test, win_tie_loss  # noqa: E402
from pflbench.analysis.statistics import entry_labels, final_clients  # noqa: E402

MAX_LINES = 8  # accuracy-versus-alpha shows at most this many algorithms (the best by mean rank)


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _palette(frame: pd.DataFrame) -> list:
    """Distinct colours for up to 20 algorithms (seaborn's default cycles after 10)."""
    return sns.color_palette("tab20", frame["algo"].nunique())


def cell_name(partition: str, alpha: float) -> str:
    """`alpha=0.1` for label skew, `exdir, alpha=0.1`, or just the partition's name where alpha is
    not one of its parameters (a quantity-skew cell keeps alpha's default in its identity, which
    would only mislead in a title or a file name)."""
    if partition not in ALPHA_SCHEMES:
        return partition
    return f"alpha={alpha:g}" if partition == "dirichlet" else f"{partition}, alpha={alpha:g}"


def cell_tag(partition: str, alpha: float) -> str:
    """The cell's part of a figure's file name: `a0.1`, `exdir_a0.1` or `quantity`."""
    if partition not in ALPHA_SCHEMES:
        return partition
    return f"a{alpha:g}" if partition == "dirichlet" else f"{partition}_a{alpha:g}"


def accuracy_vs_alpha(board: pd.DataFrame, title: str, path: Path) -> Path:
    """Accuracy against alpha with 95% interval bands, one line per algorithm of `board`."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = dict(zip(sorted(board["algo"].unique()), _palette(board)))
    for algo, part in board.sort_values("alpha").groupby("algo"):
        ax.plot(part["alpha"], part["acc"], marker="o", color=colours[algo], label=algo)
        if "acc_ci_low" in part:
            ax.fill_between(part["alpha"], part["acc_ci_low"], part["acc_ci_high"], color=colours[algo], alpha=0.15)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sorted(board["alpha"].unique()), labels=[f"{a:g}" for a in sorted(board["alpha"].unique())])
    ax.set(xlabel="Dirichlet alpha (lower = more heterogeneous)", ylabel="pooled accuracy (%)", title=title)
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    return _save(fig, path)


def labels_with_seeds(cell: pd.DataFrame) -> list[str]:
    """Row names for a figure of one cell; where its entries ran on different numbers of seeds (a
    grid still filling), each name says how many, since a one-seed interval only covers clients."""
    names = entry_labels(cell)
    if cell["seeds"].nunique() <= 1:
        return list(names)
    return [f"{name} ({int(n)} seed{'s' if n != 1 else ''})" for name, n in zip(names, cell["seeds"])]


def intervals(cell: pd.DataFrame, title: str, path: Path) -> Path:
    """Dot-and-whisker: every algorithm's accuracy and 95% interval, best first; the algorithms
    not significantly worse than the best are shaded."""
    cell = cell.sort_values("acc", ascending=True).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(cell) + 1.4))
    tied = cell["tied_best"].fillna(False).astype(bool).to_numpy()
    if tied.any():
        ax.axhspan(tied.argmax() - 0.5, len(cell) - 0.5, color="tab:green", alpha=0.12, lw=0,
                   label="tied with the best (p >= 0.05)")
    err = [cell["acc"] - cell["acc_ci_low"], cell["acc_ci_high"] - cell["acc"]]
    ax.errorbar(cell["acc"], range(len(cell)), xerr=err, fmt="o", color="k", ecolor="0.4", capsize=3, ms=4)
    ax.set_yticks(range(len(cell)), labels=labels_with_seeds(cell))
    ax.set_ylim(-0.5, len(cell) - 0.5)
    ax.set(xlabel="pooled accuracy (%) with 95% interval (bootstrap over seeds and clients)", title=title)
    if tied.any():
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


NEWCOMER_FIGURES = (("acc", "clients that trained", "o"), ("acc_new", "newcomers", "s"),
                    ("acc_new_ft", "newcomers, fine-tuned", "^"))


def newcomer_intervals(cell: pd.DataFrame, title: str, path: Path) -> Path:
    """Where some clients never trained: per algorithm, the trained clients' accuracy beside the
    newcomers' (as the algorithm serves one, then fine-tuned), each with its 95% interval, sorted by
    the newcomers' accuracy. The horizontal distance between a circle and a square is the
    participation gap."""
    cell = cell.sort_values("acc_new", ascending=True).reset_index(drop=True)
    shown = [(c, label, marker) for c, label, marker in NEWCOMER_FIGURES if c in cell and cell[c].notna().any()]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(cell) + 1.6))
    for k, (column, label, marker) in enumerate(shown):
        y = np.arange(len(cell)) + 0.22 * (k - (len(shown) - 1) / 2)
        err = [cell[column] - cell[f"{column}_ci_low"], cell[f"{column}_ci_high"] - cell[column]]
        ax.errorbar(cell[column], y, xerr=err, fmt=marker, capsize=2, ms=4, label=label)
    ax.set_yticks(range(len(cell)), labels=labels_with_seeds(cell))
    ax.set_ylim(-0.5, len(cell) - 0.5)
    ax.set(xlabel="pooled accuracy (%) with 95% interval", title=title)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=len(shown), fontsize=8, frameon=False)
    return _save(fig, path)


class StableName(str):
    """An algorithm name whose hash is the same in every process. scikit-posthocs finds the
    diagram's bars as Python sets of names, so with str's per-process hash the bars' drawing order
    (and the image's bytes) changed on every rebuild of unchanged results."""

    def __hash__(self) -> int:
        return int.from_bytes(hashlib.blake2b(self.encode(), digest_size=8).digest(), "little")

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


def critical_difference(board: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Critical-difference diagram (scikit-posthocs): mean ranks over the cells, algorithms not
    significantly different by the Nemenyi test joined by a bar; None with too few cells."""
    import scikit_posthocs

    test = rank_test(board)
    if test is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(test.ranks) + 1.6))
    names = {name: StableName(name) for name in test.ranks.index}
    ranks = test.ranks.rename(index=names)
    posthoc = test.posthoc.rename(index=names, columns=names)
    scikit_posthocs.critical_difference_diagram(ranks, posthoc, ax=ax)
    ax.set_title(f"{title}\n{test.cells} cells; Friedman p = {test.p_value:.3g}; "
                 f"Nemenyi CD = {test.critical_difference:.2f}", fontsize=9)
    return _save(fig, path)


def win_tie_loss_matrix(rows: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Heatmap: for each pair, cells where the row algorithm is significantly better minus cells
    where it is significantly worse (Holm-corrected paired tests per cell); annotated w/t/l."""
    table = win_tie_loss(rows)
    if table.empty:
        return None
    net = table.assign(net=table["wins"] - table["losses"]).pivot(index="entry", columns="other", values="net")
    order = net.sum(axis=1).sort_values(ascending=False).index
    net = net.loc[order, order]
    text = table.assign(t=[f"{w}/{t}/{l}" for w, t, l in zip(table["wins"], table["ties"], table["losses"])]) \
        .pivot(index="entry", columns="other", values="t").loc[order, order].fillna("")
    size = 0.5 * len(order) + 2
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    with warnings.catch_warnings():  # seaborn 0.13 calls matplotlib 3.11's deprecated Colormap.set_bad
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        sns.heatmap(net, annot=text, fmt="", cmap="RdBu", center=0, cbar_kws={"label": "wins - losses (cells)"},
                    annot_kws={"fontsize": 6}, ax=ax)
    ax.set(xlabel="", ylabel="", title=title)
    return _save(fig, path)


def convergence(runs: pd.DataFrame, title: str, path: Path) -> Path:
    curves = pd.concat([pd.read_csv(Path(r.run_dir) / "rounds.csv").assign(algo=r.algo)
                        for r in runs.itertuples()], ignore_index=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(data=curves, x="round", y="acc", hue="algo", marker=".", errorbar=None, ax=ax,
                 palette=_palette(curves))
    ax.set(xlabel="round", ylabel="pooled accuracy (%)", title=title)
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    return _save(fig, path)


def client_distribution(runs: pd.DataFrame, title: str, path: Path) -> Path:
    frames = []
    for r in runs.itertuples():
        clients = pd.read_csv(Path(r.run_dir) / "clients.csv")
        frames.append(clients[clients["round"] == clients["round"].max()].assign(algo=r.algo))
    data = pd.concat(frames, ignore_index=True)
    order = data.groupby("algo")["acc"].median().sort_values(ascending=False).index
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(order) + 1.5))
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        sns.boxplot(data=data, y="algo", x="acc", order=order, color="0.85", fliersize=0, ax=ax)
    saved = np.random.get_state()  # seaborn jitters with numpy's global generator: seed it, so an
    np.random.seed(0)  # unchanged cell redraws the same image
    try:
        sns.stripplot(data=data, y="algo", x="acc", order=order, size=2.5, alpha=0.6, ax=ax)
    finally:
        np.random.set_state(saved)
    ax.set(xlabel="per-client accuracy at the final evaluation (%)", ylabel="", title=title)
    return _save(fig, path)


def label_distribution(run_dir: Path, title: str, path: Path) -> Path:
    table = pd.read_csv(run_dir / "partition.csv").groupby("client").sum(numeric_only=True)
    counts = table.filter(like="class_")
    counts.columns = [c.removeprefix("class_") for c in counts.columns]
    fig, ax = plt.subplots(figsize=(min(14, 0.12 * len(counts) + 4), 4))
    counts.plot(kind="bar", stacked=True, width=0.9, ax=ax, colormap="tab20", legend=len(counts.columns) <= 20)
    ax.set(xlabel="client", ylabel="samples (train + test)", title=title)
    ax.set_xticks(range(0, len(counts), max(1, len(counts) // 25)))
    if ax.get_legend():
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=7)
    return _save(fig, path)


def markdown_table(frame: pd.DataFrame) -> str:
    """A markdown table; floats to 2 decimals, p-values (columns `p_*`) to 4."""
    def cell(column: str, v: object) -> str:
        if isinstance(v, float):
            if v != v:
                return ""
            return f"{v:.4f}" if column.startswith("p_") else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


DETAIL = ["algo", "seeds", "acc", "acc_ci_low", "acc_ci_high", "acc_std", "acc_adj", "rank", "tied_best", "diff_vs_best",
          "p_vs_best", "p_vs_fedavg", "p_vs_local", "acc_client_mean", "acc_client_p10", "best_acc", "acc_ft",
          "acc_new", "acc_new_ci_low", "acc_new_ci_high", "acc_new_ft", "participation_gap", "comm_mb", "grad_evals_vs_fedavg", "eval_adapt"]

HOW_TO_READ = (
    "How to read this page. `acc` is pooled accuracy (correct / test samples over all clients) at the final "
    "evaluation, averaged over seeds; `acc_ci_low`-`acc_ci_high` is its 95% interval from a bootstrap that "
    "resamples seeds and then clients, so even a one-seed cell shows how much its clients alone move it "
    "(`acc_std`, over seeds, is empty with one seed). Where the algorithms of a cell ran different seeds "
    "(a grid still filling), `acc_adj` is shown: the accuracy adjusted for how easy each seed is (the "
    "least-squares mean of an algorithm-plus-seed model), which picks the best and orders the ranks. "
    "Runs with the same seed share the partition, the initial model and the sampled clients, so "
    "algorithms are compared paired by seed and client: "
    "`diff_vs_best` and `p_vs_best` (a paired permutation test, Holm-corrected within the cell) say how far "
    "each algorithm is from the cell's best and whether that gap could be noise; `tied_best` marks every "
    "algorithm not significantly worse than the best, and `rank` gives them all rank 1. In the "
    "dot-and-whisker plots the shaded band holds that tied group. The critical-difference diagram places "
    "algorithms by their mean rank over the cells (lower is better); algorithms joined by a bar are not "
    "significantly different by the Nemenyi test after a Friedman test, and the wide tables are ordered "
    "by that mean rank. The win/tie/loss matrix counts, for each pair, the cells where the row algorithm "
    "is significantly better (w), not distinguishable (t) or significantly worse (l) than the column "
    "one; its colour is wins minus losses. `grad_evals_vs_fedavg` is the local compute (sample-gradients) "
    "relative to FedAvg's and `eval_adapt` what each algorithm does at test time. Where some clients never "
    "trained (`--holdout-clients`), `acc_new` is their accuracy as the algorithm serves a newcomer, "
    "`acc_new_ft` after local fine-tuning, and `participation_gap` is `acc` minus `acc_new`; the "
    "newcomers plot sets the three side by side. Each section's `Compute` line sums its runs' wall-clock "
    "time (`wall_s` in each record, by device), what the grid cost on whatever machine trained it.")


def seeds_differ(detail: pd.DataFrame) -> bool:
    """Whether the cell's entries ran different seeds, so that `acc_adj` differs from `acc`."""
    return bool((detail["acc_adj"] - detail["acc"]).abs().max() > 1e-6)


def settings_line(runs: pd.DataFrame) -> str:
    config = json.loads((Path(runs.iloc[0]["run_dir"]) / "config.json").read_text())["config"]
    keys = ("partition", "clients", "join_ratio", "rounds", "local_epochs", "batch_size", "lr", "momentum",
            "weight_decay", "model", "eval_every", "finetune_epochs", "test_ratio", "min_samples")
    later = {k: config[k] for k, default in LATER_PROTOCOL_KEYS.items() if config.get(k, default) != default}
    seeds = sorted(runs["seed"].unique())
    return (", ".join(f"{k}={v}" for k, v in [*((k, config[k]) for k in keys), *later.items()])
            + f"; seeds {', '.join(map(str, seeds))}")


def compute_line(runs: pd.DataFrame) -> str:
    """What a section's runs cost: how many, their summed wall-clock time by device, and one run's
    range, from each record's `wall_s` (a failed run records none, so only finished runs count).
    Wall-clock, not CPU, time: a run shares its machine with whatever else ran beside it."""
    timed = runs[runs["wall_s"].notna()] if "wall_s" in runs else runs.iloc[0:0]
    if timed.empty:
        return "Compute: not recorded."
    hours = timed["wall_s"].sum() / 3600
    by_device = timed["wall_s"].groupby(timed["device"]).agg(["sum", "size"])
    split = ", ".join(f"{device} {row['sum'] / 3600:.1f} h over {int(row['size'])}" for device, row in by_device.iterrows())
    minutes = timed["wall_s"] / 60
    return (f"Compute: {len(timed)} runs, {hours:.1f} hours of wall-clock time ({split}); one run took "
            f"{minutes.min():.1f} to {minutes.max():.1f} minutes (median {minutes.median():.1f}).")


def cell_heading(partition: str, alpha: float, cell: pd.DataFrame) -> str:
    """`alpha = 0.1` (or the partition's name where alpha is not its parameter), with the
    partition's measured skew beside it (means over the cell's runs; records that predate the
    measures show none)."""
    name = cell_name(partition, alpha).replace("=", " = ")
    present = [m for m in SKEW_METRICS if m in cell and cell[m].notna().any()]
    if not present:
        return name
    labels = {"skew_hellinger": "Hellinger", "skew_js": "Jensen-Shannon", "size_cv": "size CV"}
    return name + " (measured skew: " + ", ".join(f"{labels[m]} {cell[m].mean():.3f}" for m in present) + ")"


def build_report(results: Path, reports: Path) -> Path:
    """Rebuild the leaderboards, every plot and `reports/README.md` from the stored runs."""
    results, reports = Path(results), Path(reports)
    runs = load_runs(results)
    board = long_leaderboard(runs)
    write_leaderboards(results, board)
    ok = runs[runs["status"] == "ok"] if len(runs) else runs
    page = ["# pflbench report", "", f"Built by `pflbench report` from {len(ok)} stored run(s) in `{results}`.", "",
            HOW_TO_READ, ""]
    failed = runs[runs["status"] == "failed"] if len(runs) else runs
    for protocol, family in ok.groupby("protocol") if len(ok) else []:
        for dataset, part in family.groupby("dataset"):
            page += dataset_section(dataset, protocol, part, board[(board["dataset"] == dataset) &
                                                                  (board["protocol"] == protocol)], reports)
        if family["dataset"].nunique() > 1 or family["alpha"].nunique() > 1:
            page += across_cells_section(protocol, family, board[board["protocol"] == protocol], reports)
    page += tuning_section(results, runs, reports, markdown_table)
    if len(failed):
        page += ["## Failed runs", "", markdown_table(failed[["algo", "dataset", "alpha", "seed", "error"]]), ""]
    path = reports / "README.md"
    write_text(path, "\n".join(page))
    remove_stale_figures(reports, page)
    return path


# the names of the figures `build_report` draws; nothing else in the reports folder is touched
FIGURE_PREFIXES = ("cd_", "acc_vs_alpha_", "intervals_", "convergence_", "clients_", "partition_", "newcomers_",
                   "wtl_", "tuning_")


def remove_stale_figures(reports: Path, page: list[str]) -> None:
    """Delete the figures an earlier report drew that this page no longer shows (a protocol renamed,
    or its runs gone), as `write_leaderboards` does for the tables, so the folder is the report."""
    shown = set(re.findall(r"\]\(([^)]+\.png)\)", "\n".join(page)))
    for figure in reports.glob("*.png"):
        if figure.name.startswith(FIGURE_PREFIXES) and figure.name not in shown:
            figure.unlink(missing_ok=True)


def dataset_section(dataset: str, protocol: str, runs: pd.DataFrame, board: pd.DataFrame, reports: Path) -> list[str]:
    tag = f"{dataset}_{protocol}"
    wide = wide_leaderboard(board)
    page = [f"## {dataset} ({protocol})", "", f"Settings: {settings_line(runs)}.", "", compute_line(runs), "",
            markdown_table(wide), ""]
    if runs["alpha"].nunique() > 1:
        cd = critical_difference(board, f"{dataset}: mean rank over {board['alpha'].nunique()} alphas",
                                 reports / f"cd_{tag}.png")
        if cd is not None:
            page += [f"![critical difference]({cd.name})", ""]
        shown = board[board["algo"].isin(wide["algo"].head(MAX_LINES))]
        img = accuracy_vs_alpha(shown, f"{dataset}: accuracy across heterogeneity (best {MAX_LINES} by mean rank)",
                                reports / f"acc_vs_alpha_{tag}.png")
        page += [f"![accuracy versus alpha]({img.name})", ""]
    for (partition, alpha), cell in runs.groupby(["partition", "alpha"]):
        at, where = f"{tag}_{cell_tag(partition, alpha)}", f"{dataset}, {cell_name(partition, alpha)}"
        detail = board[(board["alpha"] == alpha) & (board["partition"] == partition)]
        columns = ([c for c in DETAIL if c in detail and (c != "acc_adj" or seeds_differ(detail))]
                   + [c for c in detail if c.startswith(("published_", "best_acc_vs_"))])
        figures = [
            intervals(detail, f"{where}: accuracy and 95% intervals", reports / f"intervals_{at}.png"),
            convergence(cell, f"{where}: convergence", reports / f"convergence_{at}.png"),
            client_distribution(cell, f"{where}: per-client accuracy", reports / f"clients_{at}.png"),
            label_distribution(Path(cell.iloc[0]["run_dir"]), f"{where}: label counts per client",
                               reports / f"partition_{at}.png"),
        ]
        if "acc_new" in detail and detail["acc_new"].notna().any():
            figures.append(newcomer_intervals(detail, f"{where}: trained clients and newcomers",
                                              reports / f"newcomers_{at}.png"))
        page += [f"### {cell_heading(partition, alpha, cell)}", "", markdown_table(detail[columns]), ""]
        page += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return page


def across_cells_section(protocol: str, runs: pd.DataFrame, board: pd.DataFrame, reports: Path) -> list[str]:
    cells = board.groupby(["dataset", "partition", "alpha"]).ngroups
    page = [f"## Across all {cells} cells of {protocol}", ""]
    cd = critical_difference(board, f"{protocol}: mean rank over {cells} cells", reports / f"cd_{protocol}.png")
    if cd is not None:
        page += [f"![critical difference]({cd.name})", ""]
    wtl = win_tie_loss_matrix(final_clients(runs), f"{protocol}: significant wins/ties/losses over {cells} cells",
                              reports / f"wtl_{protocol}.png")
    if wtl is not None:
        page += [f"![win/tie/loss]({wtl.name})", ""]
    return page

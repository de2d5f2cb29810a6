"""The tuning part of the report: per study the chosen values, the optimization history, and how
far the defaults are from the tuned result, on validation (the objective) and on test (the cells
run with `pflbench sweep` and `pflbench sweep --tuned`).

It reads `tuning/chosen.csv` and `tuning/trials.csv`, which `pflbench tune` writes from its
Optuna storage, and the run records: no Optuna and no training needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pflbench.analysis.leaderboard import hp_label  # noqa: E402
from pflbench.atomic import atomic_path  # noqa: E402
from pflbench.core.search import show_value  # noqa: E402

TUNING = "tuning"
PANELS_PER_ROW = 6

TUNING_HOW_TO_READ = (
    "Every algorithm had the same budget of trials (a failed trial counts), chosen by Optuna's TPE on the "
    "mean final validation accuracy over the tuning seeds (validation data carved out of each client's "
    "training share; test data never read). Trial 0 is the defaults. `val_default` and `val_tuned` are that "
    "objective for the defaults and for the choice; `test_default` and `test_tuned` are the final test "
    "accuracy of the cells run with the defaults (`pflbench sweep`) and with the choice (`pflbench sweep "
    "--tuned`) on the final seeds, which differ from the tuning seeds.")


def load_tuning(results: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    root = Path(results) / TUNING
    try:
        chosen, trials = pd.read_csv(root / "chosen.csv"), pd.read_csv(root / "trials.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    return (chosen, trials) if len(chosen) else None


def format_values(values_json: str) -> str:
    if not isinstance(values_json, str) or not values_json:
        return ""
    values = json.loads(values_json)
    return ", ".join(f"{k}={show_value(v)}" for k, v in values.items())


def optimization_history(trials: pd.DataFrame, path: Path) -> Path:
    """One panel per study: every trial's objective (failed trials as crosses on the floor), the
    best so far, and the defaults (trial 0) as a dashed line."""
    studies = list(dict.fromkeys(trials["study"]))
    cols = min(PANELS_PER_ROW, len(studies))
    rows = int(np.ceil(len(studies) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False, sharey=True)
    floor = np.nanmin(trials["objective"]) if trials["objective"].notna().any() else 0.0
    for ax, study in zip(axes.flat, studies):
        part = trials[(trials["study"] == study) & trials["counted"]].sort_values("trial")
        done = part[part["state"] == "COMPLETE"]
        failed = part[part["state"] == "FAIL"]
        ax.plot(done["trial"], done["objective"], "o", ms=3, color="tab:blue")
        ax.plot(failed["trial"], [floor] * len(failed), "x", ms=4, color="tab:red")
        best = part["objective"].where(part["state"] == "COMPLETE").cummax()
        ax.step(part["trial"], best, where="post", color="tab:green", lw=1.2)
        default = part[part["default"]]
        if len(default) and default["objective"].notna().all():
            ax.axhline(float(default["objective"].iloc[0]), ls="--", lw=0.8, color="grey")
        first = part.iloc[0] if len(part) else None
        ax.set_title(f"{first['algo']} {first['dataset']} a={first['alpha']:g}" if first is not None else study,
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(studies):]:
        ax.axis("off")
    fig.supxlabel("trial", fontsize=9)
    fig.supylabel("validation accuracy (%)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _test_accuracy(runs: pd.DataFrame, mask: pd.Series) -> tuple[float, int]:
    picked = runs[mask]
    return (float(picked["acc"].mean()), len(picked)) if len(picked) else (float("nan"), 0)


def tuning_table(chosen: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per study: choice, validation objective of defaults and choice, and the test
    accuracy (mean over final seeds) of the default and tuned cells where they were run."""
    ok = runs[runs["status"] == "ok"] if len(runs) else runs
    rows = []
    for c in chosen.itertuples(index=False):
        same = (ok["algo"] == c.algo) & (ok["dataset"] == c.dataset) & (ok["alpha"] == c.alpha) if len(ok) else None
        test_default = test_tuned = (float("nan"), 0)
        if same is not None:
            tuned = same & (ok["tuned_study"] == c.study)
            untuned = same & (ok["tuned_budget"] == 0) & (ok["settings_key"] == c.protocol)
            defaults = _default_hp_label(ok[untuned])
            test_default = _test_accuracy(ok, untuned & (ok["hp"] == defaults)) if defaults is not None else test_default
            test_tuned = _test_accuracy(ok, tuned)
        rows.append({"algo": c.algo, "dataset": c.dataset, "alpha": c.alpha, "budget": c.budget, "failed": c.failed,
                     "chosen": format_values(c.chosen), "val_default": c.default_objective, "val_tuned": c.objective,
                     "val_gain": c.objective - c.default_objective, "test_default": test_default[0],
                     "test_tuned": test_tuned[0], "test_gain": test_tuned[0] - test_default[0],
                     "final_seeds": test_tuned[1]})
    return pd.DataFrame(rows)


def _default_hp_label(untuned: pd.DataFrame) -> str | None:
    """The hp label of the defaults among an algorithm's untuned rows: the one whose records say
    they ran the declared defaults (the most common label where the records cannot tell)."""
    if untuned.empty:
        return None
    from pflbench.core.registry import get_algorithm, load_algorithms, recorded_hyperparams

    load_algorithms()
    try:
        defaults = hp_label(recorded_hyperparams(get_algorithm(untuned["algo"].iloc[0]).Hyperparams()))
    except Exception:  # an algorithm no longer registered: fall back to the common label
        return str(untuned["hp"].mode().iloc[0])
    return defaults if (untuned["hp"] == defaults).any() else None


def tuning_section(results: Path, runs: pd.DataFrame, reports: Path, markdown_table) -> list[str]:
    loaded = load_tuning(results)
    if loaded is None:
        return []
    chosen, trials = loaded
    page = ["## Tuning", "", TUNING_HOW_TO_READ, ""]
    page += [markdown_table(tuning_table(chosen, runs)), ""]
    img = optimization_history(trials, Path(reports) / "tuning_history.png")
    page += [f"![optimization history]({img.name})", "",
             "Blue: each trial's objective; red crosses: failed trials; green: best so far; dashed: the defaults.", ""]
    return page

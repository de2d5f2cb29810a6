"""What bf16 costs in accuracy: every stored bf16 run against the fp32 run of the same settings.

Why: `--precision bf16` trades numerical precision for speed (the engine benchmark measures the
speed), and precision is part of a run's protocol, so the leaderboard never averages the two. This
script answers the other half of the question from stored records, without training: per pair,
the two pooled accuracies and bf16 minus fp32 with its 95% bootstrap interval and paired
permutation p-value. The pair shares its seed, partition, initial model and sampled clients, so the
difference is paired client by client, with the leaderboard's statistics
(`pflbench.analysis.statistics.paired_difference`). Run times are printed with the device each run
trained on; they are only comparable when both ran on the same device with the machine to
themselves (a CPU without native bf16 emulates it).

    python benchmarks/precision_accuracy.py [--results DIR]

To produce the pairs, run a grid a second time with `--precision bf16`, e.g.
`pflbench sweep --config grids/fmnist.toml --algos fedavg,fedper,fedobp --alpha 0.1 --seeds 42
--precision bf16`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from pflbench.analysis.leaderboard import load_runs
from pflbench.analysis.statistics import Counts, final_clients, paired_difference, pooled
from pflbench.experiments.config import LATER_SETTINGS


def settings(run_dir: str) -> dict:
    """A run's config with later-added settings at their defaults, precision left out."""
    config = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    full = {**LATER_SETTINGS, **config}
    full.pop("precision")
    return full


def device(run_dir: str) -> str:
    """Where a run trained ("cpu", "cuda"), as its record says."""
    return json.loads((Path(run_dir) / "config.json").read_text()).get("device", "")


def pairs(results: Path) -> list[tuple[pd.Series, pd.Series]]:
    """(bf16 run, fp32 run) for every finished bf16 run whose fp32 twin is stored."""
    runs = load_runs(results)
    if runs.empty:
        return []
    runs = runs[runs["status"] == "ok"].copy()
    runs["precision"] = [json.loads((Path(d) / "config.json").read_text())["config"].get("precision", "fp32")
                         for d in runs["run_dir"]]
    fp32 = {json.dumps(settings(r.run_dir), sort_keys=True): r for _, r in runs[runs["precision"] == "fp32"].iterrows()}
    found = []
    for _, run in runs[runs["precision"] == "bf16"].iterrows():
        twin = fp32.get(json.dumps(settings(run.run_dir), sort_keys=True))
        if twin is not None:
            found.append((run, twin))
    return found


def table(results: Path) -> pd.DataFrame:
    rows = []
    for bf16, fp32 in pairs(results):
        counts = [Counts.of(final_clients(pd.DataFrame([run]))) for run in (bf16, fp32)]
        result = paired_difference(*counts)
        rows.append({"algo": bf16.algo, "dataset": bf16.dataset, "partition": bf16.partition, "alpha": bf16.alpha,
                     "seed": bf16.seed, "acc_fp32": float(pooled(counts[1].n, counts[1].correct)),
                     "acc_bf16": float(pooled(counts[0].n, counts[0].correct)), "diff": result.diff,
                     "ci_low": result.ci_low, "ci_high": result.ci_high, "p_value": result.p_value,
                     "clients_bf16_better_pct": 100 * result.client_wins, "clients_tied_pct": 100 * result.client_ties,
                     "device_fp32": device(fp32.run_dir), "wall_s_fp32": fp32.wall_s,
                     "device_bf16": device(bf16.run_dir), "wall_s_bf16": bf16.wall_s})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    out = table(args.results)
    if out.empty:
        sys.exit(f"no bf16 run in {args.results} has an fp32 twin with the same settings; "
                 "run a grid again with --precision bf16 first")
    print(out.round(3).to_string(index=False))


if __name__ == "__main__":
    main()

"""Peak memory of one FedAvg round with every one of 1,000 MNIST clients joining: the collected
list of uploads (the engine before streaming) against uploads aggregated as they arrive.

Why: holding every upload until aggregation makes a round's memory grow with the clients
sampled (1,000 uploads of the MNIST CNN are 2.3 GB). Streamed, a round holds one model plus what
the algorithm keeps per client (nothing, for FedAvg). This script shows the difference, so a
change that brings the list back shows up as a peak that grows again.

Workload: MNIST (train and test pooled, 70,000 images) from `--data-root`, split IID over
`--clients` clients (25% of each held out for testing), all joining; one round of
`--local-epochs` epoch(s) of SGD, batch 32, lr 0.01, model `--model` (`auto` is fedavgcnn on
MNIST). The list path is FedAvg with `aggregate` overridden (an override is how an algorithm asks
the engine for every upload), the arithmetic unchanged, so both modes end with the same bits.

Each mode runs in a fresh subprocess so that peaks do not mix. The peak is the process's
`ru_maxrss` after the round, with the high-water mark reset just before it (Linux
`/proc/self/clear_refs`; where that is refused, the lifetime peak, setup included). The round's
growth includes one-off costs of the first local training, the same in both modes (on the CPU
with torch 2.x about 150 MB, mostly the lazy imports of the first optimizer). On a CUDA device
`torch.cuda.max_memory_allocated` over the round is printed too. Evaluation is not run; the
round's run time is printed but is not the point (`--local-epochs 0` measures the memory alone
in a minute: the uploads are the same size).

    python benchmarks/bench_memory.py [--clients N] [--model auto|mlp|fedavgcnn] [--local-epochs E]
                                      [--data-root DIR] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from algorithms.fedavg import FedAvg
from pflbench.core.algorithm import Upload
from pflbench.core.data import load_dataset
from pflbench.core.engine import Engine, resolve_device
from pflbench.core.partition import PartitionSpec, partition
from pflbench.core.state import State, nbytes
from pflbench.experiments.config import RunConfig

MODES = ("list", "stream")
MB = 1024 * 1024


class CollectingFedAvg(FedAvg):
    """FedAvg that asks for the whole list: the engine holds every upload until the round ends."""

    def aggregate(self, uploads: list[Upload], global_state: State) -> State:
        return super().aggregate(uploads, global_state)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="clients, all joining (default 1000)")
    parser.add_argument("--model", default="auto", help="auto (fedavgcnn on MNIST), mlp or fedavgcnn")
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs (default 1)")
    parser.add_argument("--data-root", type=Path, default=Path("/work/shared/data"), help="holds mnist.npz")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.clients < 1 or args.local_epochs < 0:
        parser.error("--clients must be >= 1 and --local-epochs >= 0")
    return args


def rss_mb() -> float:
    """The resident set size now (from /proc; 0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * resource.getpagesize() / MB


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (which `ru_maxrss` reports) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def digest(state: State) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_engine(args: argparse.Namespace, mode: str, device: torch.device) -> Engine:
    data = load_dataset("mnist", args.data_root)
    config = RunConfig(algo="fedavg", dataset="mnist", partition="iid", clients=args.clients, join_ratio=1.0,
                       rounds=1, local_epochs=args.local_epochs, batch_size=32, lr=0.01, model=args.model, seed=0)
    spec = PartitionSpec(scheme="iid", num_clients=args.clients, seed=0, test_ratio=config.test_ratio)
    splits = partition(data.y.numpy(), spec)
    cls = CollectingFedAvg if mode == "list" else FedAvg
    return Engine(config, data, splits, cls, FedAvg.Hyperparams(), device)


def measure(args: argparse.Namespace) -> dict[str, object]:
    """One round in this process; the figures as a dict (printed as JSON for the parent)."""
    device = resolve_device(args.device)
    engine = build_engine(args, args.mode, device)
    assert engine.algo.streams_aggregation() == (args.mode == "stream")
    gc.collect()
    before = rss_mb()
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device) / MB
    start = time.perf_counter()
    engine.train_round(1)
    seconds = time.perf_counter() - start
    out = {"mode": args.mode, "device": str(device), "rss_before_mb": before,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_reset": reset,
           "round_s": seconds, "upload_mb": nbytes(engine.global_state) / MB, "digest": digest(engine.global_state)}
    if device.type == "cuda":
        out.update(cuda_before_mb=cuda_before, cuda_peak_mb=torch.cuda.max_memory_allocated(device) / MB)
    return out


def run_child(args: argparse.Namespace, mode: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--mode", mode, "--clients", str(args.clients), "--model", args.model,
           "--local-epochs", str(args.local_epochs), "--data-root", str(args.data_root), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} measurement failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict[str, object]], clients: int) -> None:
    first = results[MODES[0]]
    print(f"torch {torch.__version__}, device {first['device']}; FedAvg, {clients} MNIST clients all joining, "
          f"one upload {first['upload_mb']:.2f} MB ({clients * first['upload_mb']:.0f} MB for all)")
    if not all(r["peak_reset"] for r in results.values()):
        print("note: the peak could not be reset before the round; peaks include the setup")
    for mode, r in results.items():
        line = (f"{mode:>6}: peak RSS {r['peak_rss_mb']:7.0f} MB (before the round {r['rss_before_mb']:6.0f} MB, "
                f"round +{r['peak_rss_mb'] - r['rss_before_mb']:5.0f} MB), round {r['round_s']:5.1f} s")
        if "cuda_peak_mb" in r:
            line += (f"; CUDA max allocated {r['cuda_peak_mb']:.0f} MB "
                     f"(before the round {r['cuda_before_mb']:.0f} MB)")
        print(line)
    same = results["list"]["digest"] == results["stream"]["digest"]
    print(f"global models after the round: {'identical' if same else 'DIFFERENT'} "
          f"(sha256 {results['stream']['digest']})")
    if not same:
        raise SystemExit(1)


def main() -> None:
    args = parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    report({mode: run_child(args, mode) for mode in MODES}, args.clients)


if __name__ == "__main__":
    main()

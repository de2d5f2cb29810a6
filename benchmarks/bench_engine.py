"""Time one FedAvg round of the pflbench engine against a plain PyTorch loop doing the same steps.

Why: the engine wraps local SGD in algorithm hooks, state-dict copies, byte counting, timers and
a running loss. This script measures what that costs, so a regression in the harness shows up as
a ratio above 1 rather than as a slower benchmark nobody can explain.

Workload (CIFAR-10 shaped, synthetic): 60,000 normalized 3x32x32 float32 images, 10 classes,
IID over 100 clients (25% of each client held out for testing), 10 clients per round, 5 local
epochs, batch 32, lr 0.01, model `fedavgcnn` in channels_last, on a CUDA GPU when one is visible
(`--device auto`), else on the CPU with every core. The engine is also timed in bf16
(`--precision bf16`: autocast for local training), reported as its speed-up over fp32; CPUs
without native bf16 (no AVX512-BF16 or AMX) emulate it and are slower in bf16.

Both sides start from the same initial weights, train the same sampled clients on the same
tensors with the same shuffles (seeded by `stream_seed(seed, round, client, "train")`), so they
take identical SGD steps; after the untimed warm-up round the script checks that their global
models agree. Evaluation is not timed: the engine is driven through `Engine.train_round`.

    python benchmarks/bench_engine.py [--rounds N] [--repeats K] [--momentum M] [--device D]
                                      [--no-bf16] [--compare-memory-format]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from algorithms.fedavg import FedAvg
from pflbench.experiments.config import RunConfig
from pflbench.core.data import Dataset
from pflbench.core.engine import Engine, resolve_device
from pflbench.core.models import build_model
from pflbench.core.partition import ClientSplit, PartitionSpec, partition
from pflbench.core.training import stream_seed

NUM_IMAGES = 60_000
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
NUM_CLIENTS = 100
SEED = 0
AGREEMENT_TOL = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating engine/plain measurements; the fastest of each counts (default 3)")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0.0)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu or cuda")
    parser.add_argument("--no-bf16", action="store_true", help="skip the engine's bf16 timing")
    parser.add_argument("--compare-memory-format", action="store_true",
                        help="also time the plain loop with contiguous (NCHW) tensors")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    return args


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthetic_cifar10() -> Dataset:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(NUM_IMAGES, *IMAGE_SHAPE, generator=gen)
    y = torch.randint(NUM_CLASSES, (NUM_IMAGES,), generator=gen)
    return Dataset("cifar10-synthetic", x, y, NUM_CLASSES)


def run_config(rounds: int, momentum: float, precision: str = "fp32") -> RunConfig:
    return RunConfig(algo="fedavg", dataset="cifar10-synthetic", partition="iid", clients=NUM_CLIENTS,
                     join_ratio=0.1, rounds=rounds, local_epochs=5, batch_size=32, lr=0.01,
                     momentum=momentum, model="fedavgcnn", seed=SEED, test_ratio=0.25, precision=precision)


class PlainFedAvg:
    """FedAvg written directly in PyTorch: one model, load the global weights, SGD, average."""

    def __init__(self, data: Dataset, splits: list[ClientSplit], config: RunConfig,
                 schedule: list[list[int]], memory_format: torch.memory_format, device: torch.device):
        torch.manual_seed(config.seed)
        model = build_model("fedavgcnn", IMAGE_SHAPE, NUM_CLASSES).to(device)
        self.model = model.to(memory_format=memory_format)
        self.x = data.x.to(device).contiguous(memory_format=memory_format)
        self.y = data.y.to(device)
        self.train_idx = [torch.as_tensor(s.train, device=device) for s in splits]
        self.config = config
        self.schedule = schedule
        self.weights = {k: v.clone() for k, v in self.model.state_dict().items()}

    def local_sgd(self, cid: int, round_: int) -> None:
        c = self.config
        idx = self.train_idx[cid]
        gen = torch.Generator().manual_seed(stream_seed(c.seed, round_, cid, "train"))
        opt = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum)
        self.model.train()
        for _ in range(c.local_epochs):
            order = idx[torch.randperm(len(idx), generator=gen).to(idx.device)]
            for start in range(0, len(order), c.batch_size):
                take = order[start:start + c.batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(self.x[take]), self.y[take]).backward()
                opt.step()

    def train_round(self, round_: int) -> None:
        clients = self.schedule[round_ - 1]
        total = sum(len(self.train_idx[cid]) for cid in clients)
        mean = {k: torch.zeros_like(v) for k, v in self.weights.items()}
        for cid in clients:
            self.model.load_state_dict(self.weights)
            self.local_sgd(cid, round_)
            for k, v in self.model.state_dict().items():
                mean[k].add_(v, alpha=len(self.train_idx[cid]) / total)
        self.weights = mean


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_round(train_round: Callable[[int], object], rounds: range) -> float:
    synchronize()
    start = time.perf_counter()
    for r in rounds:
        train_round(r)
    synchronize()
    return (time.perf_counter() - start) / len(rounds)


def max_weight_gap(engine: Engine, plain: PlainFedAvg) -> float:
    return max((engine.global_state[k] - plain.weights[k]).abs().max().item() for k in plain.weights)


def build_loops(args: argparse.Namespace) -> tuple[Engine, dict[str, PlainFedAvg], Engine | None]:
    """The fp32 engine, the plain loops, and the bf16 engine (None with --no-bf16)."""
    device = resolve_device(args.device)
    data = synthetic_cifar10()
    spec = PartitionSpec(scheme="iid", num_clients=NUM_CLIENTS, seed=SEED, test_ratio=0.25)
    splits = partition(data.y.numpy(), spec)
    rounds = 1 + args.rounds * args.repeats
    engine = Engine(run_config(rounds, args.momentum), data, splits, FedAvg, FedAvg.Hyperparams(), device)
    bf16 = None if args.no_bf16 else Engine(run_config(rounds, args.momentum, "bf16"), data, splits, FedAvg,
                                             FedAvg.Hyperparams(), device)
    formats = {"plain": torch.channels_last}
    if args.compare_memory_format:
        formats["plain contiguous"] = torch.contiguous_format
    plains = {name: PlainFedAvg(data, splits, engine.config, engine.schedule, fmt, device)
              for name, fmt in formats.items()}
    return engine, plains, bf16


def warm_up(engine: Engine, plains: dict[str, PlainFedAvg]) -> None:
    """Round 1 untimed on every side. The channels_last plain loop runs the engine's kernels, so
    its weights must match; the contiguous one differs by float rounding of other kernels."""
    engine.train_round(1)
    for name, plain in plains.items():
        plain.train_round(1)
        gap = max_weight_gap(engine, plain)
        if name == "plain" and gap > AGREEMENT_TOL:
            raise SystemExit(f"engine and plain loop diverged (max weight gap {gap:.2e}); not comparable")
        print(f"warm-up round: max |engine - {name}| weight gap {gap:.1e}")


def measure(loops: dict[str, Callable[[int], object]], rounds: int, repeats: int) -> dict[str, float]:
    """Seconds per round of each loop, best of `repeats` alternating measurements of `rounds` rounds."""
    best = {name: float("inf") for name in loops}
    for rep in range(repeats):
        timed = range(2 + rep * rounds, 2 + (rep + 1) * rounds)
        times = {name: seconds_per_round(loop, timed) for name, loop in loops.items()}
        best = {name: min(best[name], t) for name, t in times.items()}
        print(f"repeat {rep + 1}/{repeats}, rounds {timed.start}-{timed.stop - 1}: "
              + ", ".join(f"{name} {t:.2f}" for name, t in times.items()) + " s/round")
    return best


def main() -> None:
    args = parse_args()
    torch.set_num_threads(cpu_count())
    engine, plains, bf16 = build_loops(args)
    c = engine.config
    steps = c.local_epochs * sum(-(-engine.clients[cid].n_train // c.batch_size) for cid in engine.schedule[0])
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    print(f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{c.clients_per_round} clients/round, {steps} SGD steps in round 1, momentum {c.momentum}")
    warm_up(engine, plains)
    loops = {"engine": engine.train_round, **{name: p.train_round for name, p in plains.items()}}
    if bf16 is not None:
        bf16.train_round(1)
        loops["engine bf16"] = bf16.train_round
    best = measure(loops, args.rounds, args.repeats)
    if args.compare_memory_format:
        cl, nchw = best["plain"], best["plain contiguous"]
        winner = "channels_last" if cl < nchw else "contiguous"
        print(f"plain loop memory format: channels_last {cl:.2f} s/round, contiguous {nchw:.2f} s/round "
              f"-> {winner} is faster by {max(cl, nchw) / min(cl, nchw):.2f}x")
    print(f"engine/plain ratio: {best['engine'] / best['plain']:.2f} "
          f"(engine {best['engine']:.2f} s/round, plain {best['plain']:.2f} s/round)")
    if bf16 is not None:
        print(f"engine bf16: {best['engine bf16']:.2f} s/round, {best['engine'] / best['engine bf16']:.2f}x "
              "the speed of fp32")


if __name__ == "__main__":
    main()

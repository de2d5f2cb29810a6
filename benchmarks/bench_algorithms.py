"""Cost of one round of every registered algorithm on the same workload, relative to FedAvg.

Why: accuracy alone hides that some methods do far more local work (Ditto trains two models,
pFedMe takes K inner steps per batch, FedDPA computes a per-sample Fisher) or more server work
(FedOBP ranks every element of the model for each client). The engine counts local compute
exactly in sample-gradients (`grad_evals`); this script adds the wall-clock side: seconds per
round, and seconds per 1,000 sample-gradients, whose ratio to FedAvg's says whether an
algorithm's extra time is extra work (ratio near 1) or overhead per unit of work (ratio above 1).

Workload (Fashion-MNIST shaped, synthetic): 6,000 normalized 1x28x28 images, 10 classes, IID over
20 clients, all joining every round, 2 local epochs, batch 32, lr 0.01, momentum 0.7, model
`fedavgcnn` (`fedavgcnn_bn` for an algorithm that needs BatchNorm: FedBN); one untimed warm-up round (so every client has the history an algorithm keeps), then
`--rounds` timed rounds (best of `--repeats`), then one timed evaluation of every client.
Evaluation compute (test-time adaptation: FedBABU's fine-tuning, FedDPA's Fisher merge,
FedALA's ALA) is counted apart, as `eval_grad_evals`.

    python benchmarks/bench_algorithms.py [--algos a,b] [--rounds N] [--repeats K] [--device D]
                                          [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from pflbench.experiments.config import RunConfig
from pflbench.core.data import Dataset
from pflbench.core.engine import Engine, resolve_device
from pflbench.core.models import batchnorm_variant
from pflbench.core.partition import PartitionSpec, partition
from pflbench.core.registry import ALGORITHMS, get_algorithm, load_algorithms, resolve_hyperparams

NUM_IMAGES = 6_000
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
NUM_CLIENTS = 20
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="all", help="comma-separated names, or all (default)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per measurement (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements; the fastest counts (default 2)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    return args


def synthetic_fmnist() -> Dataset:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(NUM_IMAGES, *IMAGE_SHAPE, generator=gen)
    y = torch.randint(NUM_CLASSES, (NUM_IMAGES,), generator=gen)
    return Dataset("fmnist-synthetic", x, y, NUM_CLASSES)


def measure(name: str, data: Dataset, splits, rounds: int, repeats: int, device: torch.device) -> dict:
    cls = get_algorithm(name)
    model = batchnorm_variant("fedavgcnn") if cls.model_needs == "batchnorm" else "fedavgcnn"  # FedBN: fedavgcnn_bn
    config = RunConfig(algo=name, dataset=data.name, partition="iid", clients=NUM_CLIENTS, join_ratio=1.0,
                       rounds=1 + rounds * repeats, local_epochs=2, batch_size=32, lr=0.01, momentum=0.7,
                       model=model, seed=SEED)
    engine = Engine(config, data, splits, cls, resolve_hyperparams(cls, {}), device)
    engine.train_round(1)
    best, per_round = float("inf"), 0
    for rep in range(repeats):
        before = engine.trainer.grad_evals
        start = time.perf_counter()
        for r in range(2 + rep * rounds, 2 + (rep + 1) * rounds):
            engine.train_round(r)
        best = min(best, (time.perf_counter() - start) / rounds)
        per_round = (engine.trainer.grad_evals - before) // rounds
    before = engine.trainer.grad_evals
    start = time.perf_counter()
    engine.evaluate(config.rounds)
    eval_s = time.perf_counter() - start
    return {"algo": name, "s_round": best, "grad_evals": per_round, "eval_s": eval_s,
            "eval_grad_evals": engine.trainer.grad_evals - before}


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_algorithms()
    names = sorted(ALGORITHMS) if args.algos == "all" else [a.strip() for a in args.algos.split(",")]
    if "fedavg" not in names:
        names.insert(0, "fedavg")
    data = synthetic_fmnist()
    splits = partition(data.y.numpy(), PartitionSpec(scheme="iid", num_clients=NUM_CLIENTS, seed=SEED,
                                                     test_ratio=0.25))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, device {device} ({device_name}), {torch.get_num_threads()} threads; "
          f"{NUM_CLIENTS} clients all joining, 2 local epochs, fedavgcnn, FMNIST-shaped synthetic data")
    measure("fedavg", data, splits, 1, 1, device)  # untimed: the process's first rounds pay one-off
    rows = []  # setup (oneDNN primitives, allocator caches), which would inflate the baseline
    for name in names:
        rows.append(measure(name, data, splits, args.rounds, args.repeats, device))
        print(f"  measured {name}: {rows[-1]['s_round']:.2f} s/round", flush=True)
    base = next(r for r in rows if r["algo"] == "fedavg")
    base_per_k = base["s_round"] / base["grad_evals"] * 1000
    header = ["algo", "s/round", "x FedAvg", "grad_evals/round", "x FedAvg", "ms per 1k grad_evals",
              "x FedAvg", "eval s", "eval grad_evals"]
    lines = []
    for r in rows:
        per_k = r["s_round"] / r["grad_evals"] * 1000 if r["grad_evals"] else float("nan")
        lines.append([r["algo"], f"{r['s_round']:.2f}", f"{r['s_round'] / base['s_round']:.2f}",
                      str(r["grad_evals"]), f"{r['grad_evals'] / base['grad_evals']:.2f}",
                      f"{per_k * 1000:.1f}", f"{per_k / base_per_k:.2f}", f"{r['eval_s']:.2f}",
                      str(r["eval_grad_evals"])])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()

"""Time the empirical diagonal Fisher (`pflbench.core.fisher.squared_sample_grads`) both ways,
against a batched gradient over the same samples.

Why: FedDPA computes a client's Fisher at every participation and at every evaluation, so on the
committed grids its per-sample gradients were most of its run time. The squares of per-sample
gradients cannot come from a batched backward pass; this script says how close each exact method
gets to that pass's cost: `hooks` (per layer, from inputs and output gradients) and `vmap`
(`torch.func`, every per-sample gradient materialized).

Workload: `fedavgcnn` in eval mode on 1,024 synthetic samples shaped like Fashion-MNIST (1x28x28)
and like CIFAR-10 (3x32x32), 10 classes; the yardstick is one backward pass per batch of 32 (what
local training does per sample). Seconds per 1,024 samples, best of `--repeats`, after one
untimed call; the two methods' results are checked to agree first.

    python benchmarks/bench_fisher.py [--repeats K] [--threads T] [--device D]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pflbench.core.engine import resolve_device
from pflbench.core.fisher import squared_sample_grads
from pflbench.core.models import fedavgcnn

SAMPLES = 1_024
BATCH = 32
SHAPES = {"fmnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the fastest counts (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 0:
        parser.error("--repeats must be >= 1 and --threads >= 0")
    return args


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{SAMPLES} samples, seconds per call (best of {args.repeats})")
    print(f"{'data':8} {'batched/32':>10} {'hooks':>8} {'vmap':>8} {'hooks/batched':>14} {'vmap/hooks':>11}")
    for name, shape in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = fedavgcnn(shape, 10).to(device).eval()
        x = torch.randn(SAMPLES, *shape, generator=gen).to(device)
        y = torch.randint(10, (SAMPLES,), generator=gen).to(device)
        index = torch.arange(SAMPLES, device=device)
        hooks = squared_sample_grads(model, x, y, index, method="hooks")
        vmapped = squared_sample_grads(model, x, y, index, method="vmap")
        gap = max(float((hooks[n] - vmapped[n]).abs().max() / vmapped[n].abs().max()) for n in hooks)
        assert gap < 1e-4, f"the two methods disagree on {name} (relative gap {gap:.1e})"

        def batched() -> None:
            for take in index.split(BATCH):
                loss = F.cross_entropy(model(x[take]), y[take])
                torch.autograd.grad(loss, list(model.parameters()))

        t_batched = best_time(batched, args.repeats, device)
        t_hooks = best_time(lambda: squared_sample_grads(model, x, y, index, method="hooks"), args.repeats, device)
        t_vmap = best_time(lambda: squared_sample_grads(model, x, y, index, method="vmap"), args.repeats, device)
        print(f"{name:8} {t_batched:10.3f} {t_hooks:8.3f} {t_vmap:8.3f} {t_hooks / t_batched:14.2f} "
              f"{t_vmap / t_hooks:11.2f}")


if __name__ == "__main__":
    main()

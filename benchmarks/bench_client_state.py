"""What every algorithm keeps per client, measured: bytes held by the algorithm after one round in
which every one of 1,000 MNIST clients trains, divided by the clients.

Why: an algorithm's memory is one model plus what it keeps per client (a head, a control variate,
a whole model, a hypernetwork); with 1,000 clients that per-client term dominates, and it is the
number a user needs before running a cross-device simulation. Each algorithm declares it in words
(`client_state`, shown by `pflbench list`); this script measures it in bytes.

The measure is exact, not a resident-set estimate: every tensor reachable from the algorithm
object (its dicts, lists, modules, optimizers; the engine's shared model and global state left
out), each storage counted once, after the round, divided by the number of clients. It includes
what an algorithm allocates for every client up front (APPLE's matrix of core models, pFedLA's
hypernetworks) and its one-off scratch copies (a model or two: 0.002 of a model per client at
1,000 clients). It is also given in units of the model (bytes per client / one model state's bytes), so
it reads the same for any model. Settings: MNIST from `--data-root` split IID over `--clients`
clients (25% of each held out for testing), all joining one round of one local epoch, batch 32,
lr 0.01, model `--model` (default fedavgcnn; its BatchNorm version for FedBN, as a sweep gives it);
every algorithm at its default hyperparameters.

    python benchmarks/bench_client_state.py [--algos a,b] [--clients N] [--model M] [--data-root DIR]
                                            [--markdown]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pflbench.core.data import load_dataset
from pflbench.core.engine import Engine, resolve_device
from pflbench.core.models import batchnorm_variant
from pflbench.core.partition import PartitionSpec, partition
from pflbench.core.registry import ALGORITHMS, get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.core.state import nbytes
from pflbench.experiments.config import RunConfig

MB = 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="all", help="comma-separated names (default: every registered one)")
    parser.add_argument("--clients", type=int, default=1000, help="clients, all joining (default 1000)")
    parser.add_argument("--model", default="fedavgcnn", help="model (default fedavgcnn)")
    parser.add_argument("--data-root", type=Path, default=Path("/work/shared/data"), help="holds mnist.npz")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if args.clients < 2:
        parser.error("--clients must be >= 2")
    return args


def reachable_tensors(obj: Any, skip: set[int], seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj` through containers, modules, optimizers and object
    attributes, not entering the objects whose ids are in `skip`."""
    seen = set() if seen is None else seen
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or id(item) in skip or item is None:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, nn.Module):
            stack.extend(item.parameters())
            stack.extend(item.buffers())
            stack.extend(v for k, v in vars(item).items() if not k.startswith("_"))
        elif isinstance(item, torch.optim.Optimizer):
            stack.append(item.state)
            stack.append(item.param_groups)
        elif hasattr(item, "__dict__") and not isinstance(item, type) and type(item).__module__ != "builtins":
            stack.extend(vars(item).values())


def held_bytes(engine: Engine) -> int:
    """Bytes of the distinct storages the algorithm holds (the shared model, the engine's global
    state, the dataset and the context left out)."""
    skip = {id(engine.model), id(engine.global_state), id(engine.trainer), id(engine.clients), id(engine.algo.ctx)}
    skip |= {id(t) for t in engine.global_state.values()}
    skip |= {id(p) for p in engine.model.parameters()} | {id(b) for b in engine.model.buffers()}
    storages: dict[int, int] = {}
    for tensor in reachable_tensors(engine.algo, skip):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(name: str, args: argparse.Namespace, data, splits, device: torch.device) -> dict[str, Any]:
    cls = get_algorithm(name)
    model = batchnorm_variant(args.model) if cls.model_needs == "batchnorm" else args.model  # as a sweep does
    config = RunConfig(algo=name, dataset="mnist", partition="iid", clients=args.clients, join_ratio=1.0,
                       rounds=1, local_epochs=1, batch_size=32, lr=0.01, model=model, seed=0)
    engine = Engine(config, data, splits, cls, resolve_hyperparams(cls, {}), device)
    start = time.perf_counter()
    engine.train_round(1)
    seconds = time.perf_counter() - start
    grown = held_bytes(engine)
    model_bytes = nbytes(engine.global_state)
    return {"algo": name, "per_client": grown / args.clients, "x_model": grown / args.clients / model_bytes,
            "total_mb": grown / MB, "round_s": seconds,
            "declared": cls.describe_client_state(resolve_hyperparams(cls, {}))}


def main() -> None:
    args = parse_args()
    load_algorithms()
    names = sorted(ALGORITHMS) if args.algos == "all" else [a for a in args.algos.split(",") if a]
    device = resolve_device(args.device)
    data = load_dataset("mnist", args.data_root)
    splits = partition(data.y.numpy(), PartitionSpec(scheme="iid", num_clients=args.clients, seed=0,
                                                     test_ratio=0.25))
    rows = []
    for name in names:
        try:
            rows.append(measure(name, args, data, splits, device))
        except Exception as exc:  # one algorithm's failure must not hide the others' figures
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        r = rows[-1]
        if not args.markdown:
            print(f"{name:<10} {r['per_client'] / 1024:10.1f} KB/client  {r['x_model']:6.2f} x model  "
                  f"{r['total_mb']:8.1f} MB total  round {r['round_s']:6.1f} s   ({r['declared']})", flush=True)
    if args.markdown:
        print(f"| algo | KB per client | x model | MB for {args.clients} clients | declared |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['algo']} | {r['per_client'] / 1024:.1f} | {r['x_model']:.2f} | {r['total_mb']:.0f} | "
                  f"{r['declared']} |")


if __name__ == "__main__":
    main()

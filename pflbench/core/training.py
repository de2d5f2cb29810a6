"""Local SGD and evaluation on one client's slice of the preloaded dataset.

Batches are drawn by shuffled index straight from the dataset tensors on the device: no data
loader, no per-sample Python. Every shuffle comes from a generator seeded by (seed, round,
client, purpose), so a client's batches do not depend on which algorithm runs or on the order
in which clients are visited.

Compute is counted exactly in sample-gradients (`Trainer.grad_evals`): one per sample per forward
and backward pass. `sgd` counts its batches itself; an algorithm with a loop of its own calls
`count_grads` for every pass it makes (two passes on one batch count twice, a per-sample gradient
counts one per sample, a finite-difference Hessian-vector product two). Forward-only passes
(evaluation, statistics) are not gradients and are not counted.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.data import Dataset

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
EVAL_BATCH = 4096


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def precision_context(precision: str, device: torch.device) -> ContextManager:
    """The numeric precision of local training and evaluation: `fp32`, or `bf16` autocast
    (matrix products and convolutions in bfloat16, losses, reductions and weights in float32, as
    torch.autocast does). CPUs without native bf16 (AVX512-BF16 or AMX) emulate it, more slowly.

    The context spans whole local schedules (optimizer steps included), so autocast's cache of
    bf16 weight copies is off: with it on, every forward pass in the context would reuse the
    weights as they were at its first pass, and training would not move the model it evaluates."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from any parts; stable across machines and Python runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class ClientData:
    """Index tensors of one client's local train, test and (possibly empty) validation samples
    into the dataset pool."""

    train: torch.Tensor
    test: torch.Tensor
    val: torch.Tensor | None = None

    @property
    def n_val(self) -> int:
        return 0 if self.val is None else len(self.val)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)


@dataclass
class TrainStats:
    loss_sum: float = 0.0
    samples: int = 0

    def __iadd__(self, other: "TrainStats") -> "TrainStats":
        self.loss_sum += other.loss_sum
        self.samples += other.samples
        return self


@dataclass
class EvalResult:
    n: int
    correct: int
    loss_sum: float


class Trainer:
    """SGD epochs and evaluation for any client, with the run's optimizer settings."""

    def __init__(self, data: Dataset, clients: list[ClientData], seed: int, batch_size: int,
                 lr: float, momentum: float, weight_decay: float):
        self.data = data
        self.clients = clients
        self.seed = seed
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.grad_evals = 0

    def count_grads(self, samples: int, passes: int = 1) -> None:
        """Record `passes` forward+backward passes over `samples` samples (see the module doc)."""
        self.grad_evals += samples * passes

    def optimizer(self, params: Iterable[torch.Tensor], lr: float | None = None) -> torch.optim.SGD:
        return torch.optim.SGD(list(params), lr=self.lr if lr is None else lr,
                               momentum=self.momentum, weight_decay=self.weight_decay)

    def batch_indices(self, cid: int, epochs: int, round_: int, purpose: str = "train"
                      ) -> Iterable[torch.Tensor]:
        """Pool indices of client `cid`'s shuffled training mini-batches, `epochs` passes."""
        idx = self.clients[cid].train
        gen = torch.Generator().manual_seed(stream_seed(self.seed, round_, cid, purpose))
        for _ in range(epochs):
            order = idx[torch.randperm(len(idx), generator=gen).to(idx.device)]
            yield from order.split(self.batch_size)

    def batches(self, cid: int, epochs: int, round_: int, purpose: str = "train"
                ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for take in self.batch_indices(cid, epochs, round_, purpose):
            yield self.data.x[take], self.data.y[take]

    def sgd(self, model: nn.Module, cid: int, epochs: int, round_: int, *,
            params: Iterable[torch.Tensor] | None = None, optimizer: torch.optim.Optimizer | None = None,
            loss_fn: LossFn = cross_entropy, purpose: str = "train") -> TrainStats:
        """Train `model` in place; only `params` (default: all) are updated, with a fresh
        optimizer unless one is passed in."""
        model.train()
        opt = optimizer or self.optimizer(model.parameters() if params is None else params)
        loss_sum = torch.zeros((), device=self.data.x.device)
        samples = 0
        for xb, yb in self.batches(cid, epochs, round_, purpose):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, xb, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(yb)
            samples += len(yb)
        self.count_grads(samples)
        return TrainStats(loss_sum=float(loss_sum), samples=samples)

    @torch.no_grad()
    def body_features(self, model: nn.Module, cid: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """`model.body` of every sample of client `cid`'s `split` in evaluation mode, in chunks,
        and their labels: what feature-statistics methods (FedPAC's centroids, pFedFDA's Gaussian
        estimates) are computed from."""
        model.eval()
        idx = getattr(self.clients[cid], split)
        feats = [model.body(self.data.x[idx[s:s + EVAL_BATCH]]) for s in range(0, len(idx), EVAL_BATCH)]
        return torch.cat(feats), self.data.y[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, cid: int, split: str = "test") -> EvalResult:
        """Correct predictions and summed cross-entropy on client `cid`'s local test set (or its
        validation set, `split="val"`)."""
        model.eval()
        idx = getattr(self.clients[cid], split)
        correct = torch.zeros((), dtype=torch.long, device=self.data.x.device)
        loss_sum = torch.zeros((), device=self.data.x.device)
        for start in range(0, len(idx), EVAL_BATCH):
            take = idx[start:start + EVAL_BATCH]
            logits = model(self.data.x[take])
            y = self.data.y[take]
            correct += (logits.argmax(1) == y).sum()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
        return EvalResult(n=len(idx), correct=int(correct), loss_sum=float(loss_sum))

"""Training only some elements of a model's tensors (element masks), for algorithms whose
personal part is an element mask (FedDPA's Fisher mask, FedSelect's subnetwork).

An optimizer updates whole tensors, and momentum or weight decay would move an element whose
gradient is zero; so the frozen elements are written back after every step instead of having
their gradients zeroed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pflbench.core.training import Trainer, TrainStats, cross_entropy

Mask = dict[str, torch.Tensor]


class RestoringOptimizer:
    """An optimizer whose steps leave chosen elements exactly where they were.

    `frozen` lists (parameter, bool mask of frozen elements); their values are taken when the
    wrapper is built and written back after every step."""

    def __init__(self, optimizer: torch.optim.Optimizer, frozen: list[tuple[torch.Tensor, torch.Tensor]]):
        self.optimizer = optimizer
        self.frozen = [(p, m, p.detach().clone()) for p, m in frozen]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for param, mask, value in self.frozen:
            param.copy_(torch.where(mask, value, param))


def train_elements(trainer: Trainer, model: nn.Module, cid: int, epochs: int, round_: int,
                   trainable: Mask, loss_fn: Callable = cross_entropy, purpose: str = "train") -> TrainStats:
    """`epochs` of the run's SGD on the elements where `trainable` is True (others untouched).

    Tensors with no trainable element are left out of the optimizer; when every element of every
    tensor is trainable this is exactly `trainer.sgd(model, ...)` with all parameters. Nothing to
    train (or `epochs` = 0) is no work and no gradient evaluations."""
    named = list(model.named_parameters())
    params = [p for n, p in named if bool(trainable[n].any())]
    frozen = [(p, ~trainable[n]) for n, p in named if bool(trainable[n].any()) and not bool(trainable[n].all())]
    if not params or epochs == 0:
        return TrainStats()
    optimizer = trainer.optimizer(params)
    if frozen:
        optimizer = RestoringOptimizer(optimizer, frozen)
    return trainer.sgd(model, cid, epochs, round_, optimizer=optimizer, loss_fn=loss_fn, purpose=purpose)

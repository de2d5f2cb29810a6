"""Loss terms shared by algorithms that pull a model towards an anchor (FedProx's global model,
Ditto's personal model towards the global one)."""

from __future__ import annotations

import torch
from torch import nn

from pflbench.core.state import State
from pflbench.core.training import LossFn, cross_entropy


def proximal_loss(anchor: State, coef: float) -> LossFn:
    """A loss function `CE(model) + coef/2 * ||params - anchor||^2` over the parameters named in
    `anchor` (the anchor tensors are constants: no gradient flows into them)."""
    half = 0.5 * coef

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(model, x, y)
        squares = [(p - anchor[n]).square().sum() for n, p in model.named_parameters() if n in anchor]
        return loss + half * torch.stack(squares).sum()

    return loss_fn

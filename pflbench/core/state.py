"""Model state as a plain `{parameter name: tensor}` dict, and the arithmetic on it.

One model object is reused across clients: a client's state is copied into it before training
and copied out after, so the engine never holds more models than an algorithm keeps.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

State = dict[str, torch.Tensor]


def get_state(model: nn.Module, keys: Iterable[str] | None = None) -> State:
    """Detached copies of the model's parameters (all, or those named in `keys`)."""
    wanted = None if keys is None else set(keys)
    return {n: p.detach().clone() for n, p in model.named_parameters() if wanted is None or n in wanted}


@torch.no_grad()
def set_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the tensors of `state` into the model's parameters of the same name."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def subset(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> State:
    return {k: state[k] for k in keys if k in state}


@torch.no_grad()
def weighted_mean(states: list[Mapping[str, torch.Tensor]], weights: list[float]) -> State:
    """Sum of w_i * state_i with weights normalized to 1, over the keys of the first state."""
    total = float(sum(weights))
    scale = [w / total for w in weights]
    mean = {}
    for key in states[0]:
        acc = states[0][key] * scale[0]
        for state, s in zip(states[1:], scale[1:]):
            acc.add_(state[key], alpha=s)
        mean[key] = acc
    return mean


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant tensor maps to zeros (no 0/0)."""
    low, high = x.min(), x.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(x)
    return (x - low) / span

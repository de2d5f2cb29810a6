"""Model state as a plain `{tensor name: tensor}` dict, and the arithmetic on it.

A state holds the model's parameters and its floating-point buffers: the running mean and
variance of BatchNorm layers are state like the weights, so they travel (or stay on the client)
with the role of their layer and are counted in the bytes. BatchNorm's integer
`num_batches_tracked` is not state: with a fixed momentum (the default) it is never read.

One model object is reused across clients: a client's state is copied into it before training
and copied out after, so the engine never holds more models than an algorithm keeps.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

State = dict[str, torch.Tensor]


def state_tensors(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state tensors by name: its parameters, then its persistent floating-point
    buffers (normalization statistics). Models without buffers have exactly their parameters; a
    non-persistent buffer (a setting an algorithm writes before each use, as Floco's point on the
    simplex) is not state."""
    yield from model.named_parameters(prefix=prefix)
    persistent = model.state_dict(prefix=f"{prefix}." if prefix else "", keep_vars=True)
    for name, buf in model.named_buffers(prefix=prefix):
        if name in persistent and buf.is_floating_point():
            yield name, buf


def get_state(model: nn.Module, keys: Iterable[str] | None = None) -> State:
    """Detached copies of the model's state tensors (all, or those named in `keys`)."""
    wanted = None if keys is None else set(keys)
    return {n: p.detach().clone() for n, p in state_tensors(model) if wanted is None or n in wanted}


@torch.no_grad()
def set_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the tensors of `state` into the model's state tensors of the same name."""
    tensors = dict(state_tensors(model))
    for name, value in state.items():
        tensors[name].copy_(value)


def subset(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> State:
    return {k: state[k] for k in keys if k in state}


class RunningMean:
    """A weighted mean of states that arrive one at a time, holding one state's tensors, not all.

    Each state is scaled by `weight / total` as it arrives, `total` being the sum of the weights
    announced up front, and added to the running sum in arrival order: the operations, their
    order and their float32 rounding are those of a mean over the collected list, so the result
    is the same to the bit (the sum stays in the states' dtype for that reason; a float64 sum
    would be more accurate but would change every result at the rounding level and double the
    memory). A tensor that only some states carry is averaged over those: its sum is rescaled by
    `total / (their weight)` at the end, exact within one rounding. Without a positive `total`,
    the sums are of `weight * state` and divided at the end.
    """

    def __init__(self, total: float = 0.0):
        self.total = float(total)
        self.sums: State = {}
        self.weights: dict[str, float] = {}  # per tensor name: the weight of the states that sent it

    @property
    def norm(self) -> float:
        return self.total if self.total > 0 else 1.0

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        scale = weight / self.norm
        for key, value in state.items():
            if key in self.sums:
                self.sums[key].add_(value, alpha=scale)
            else:
                self.sums[key] = value * scale  # a new tensor: the running sum never aliases a state
            self.weights[key] = self.weights.get(key, 0) + weight

    @torch.no_grad()
    def result(self) -> State:
        """The mean of every tensor some state sent with a positive weight (the sums themselves
        where every announced weight arrived: no further arithmetic)."""
        mean = {}
        for key, acc in self.sums.items():
            got = self.weights[key]
            if got > 0:
                mean[key] = acc if got == self.norm else acc * (self.norm / got)
        return mean


def weighted_mean(states: list[Mapping[str, torch.Tensor]], weights: list[float]) -> State:
    """Sum of w_i * state_i with weights normalized to 1 (a tensor some states lack is averaged
    over those that have it). The same arithmetic as streaming the states into a `RunningMean`."""
    mean = RunningMean(sum(weights))
    for state, w in zip(states, weights):
        mean.add(state, w)
    return mean.result()


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant tensor maps to zeros (no 0/0)."""
    low, high = x.min(), x.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(x)
    return (x - low) / span

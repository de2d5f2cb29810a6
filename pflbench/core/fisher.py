"""The empirical diagonal Fisher information: for every parameter, the sum over samples of the
squared per-sample gradient of log p(y | x). FedDPA thresholds it element by element and FedAS
(`fisher=sample`) takes its trace, so it lives here, once.

A batched backward pass sums the per-sample gradients before anyone can square them, so the
squares need per-sample information. Two exact ways to get it:

- `hooks` (used whenever the model allows it): forward hooks keep each layer's input a, one
  backward pass gives the gradient d of the summed loss with respect to each layer's output, and
  the squares come from those, layer by layer. For a linear layer fed one vector per sample the
  per-sample weight gradient is the outer product d_i a_i^T, so the sum of its squares is the one
  matrix product (d^2)^T (a^2), never materialized per sample. A convolution's per-sample weight
  gradient sums over output positions, d_i unfold(a_i)^T, so it is materialized per sample (one
  batched matrix product over a chunk of samples) and squared. This is the approach of BackPACK's
  `SumGradSquared` extension (Dangel, Kunstner and Hennig, ICLR 2020) for these two layers.
- `vmap`: `torch.func.vmap` of `torch.func.grad` over the samples materializes every parameter's
  per-sample gradient and squares it. Any model, but three to five times slower on `fedavgcnn`
  (benchmarks/bench_fisher.py).

`auto` takes `hooks` when every parameter belongs to an `nn.Linear` or an `nn.Conv2d` (ungrouped,
zero padding given as numbers) and each such layer runs once per forward pass; otherwise (a
BatchNorm layer, a parameter used outside a layer, a layer called twice) `vmap`. The two agree to
float rounding (tests/test_fisher.py checks both against a per-sample loop).

The model is evaluated as given (callers put it in eval mode, so that BatchNorm uses its running
statistics and every sample's loss depends on that sample alone).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

Method = Literal["auto", "hooks", "vmap"]

HOOKS_CHUNK = (1 << 22, 64)  # (per-sample values held at once, most samples per chunk)
VMAP_CHUNK = (1 << 24, 1024)


def squared_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                         method: Method = "auto") -> dict[str, torch.Tensor]:
    """Sum over the samples `x[index]`, `y[index]` of (d log p(y|x) / d theta)^2 for every named
    parameter theta of `model` (a dict of tensors shaped like the parameters, float32, detached).
    Divide by `len(index)` for the empirical Fisher's diagonal."""
    if method not in ("auto", "hooks", "vmap"):
        raise ValueError(f"method must be auto, hooks or vmap (got {method!r})")
    if method == "hooks" or (method == "auto" and hooks_apply(model)):
        totals = _by_hooks(model, x, y, index)
        if totals is not None:
            return totals
        if method == "hooks":
            raise ValueError("method=hooks needs each linear or convolution layer to run once "
                             "per forward pass")
    return _by_vmap(model, x, y, index)


def hooks_apply(model: nn.Module) -> bool:
    """Whether every parameter belongs to a layer the `hooks` method handles."""
    owned: list[int] = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not _supported(module):
            return False
        owned += [id(p) for p in own]
    shared = len(owned) != len(set(owned))  # one tensor in two layers: its squares do not add up
    return not shared and set(owned) == {id(p) for p in model.parameters()}


def _supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _chunk_size(per_sample_elements: int, budget: tuple[int, int]) -> int:
    """Samples per chunk: as many as keep `per_sample_elements` each within the budget."""
    elements, most = budget
    return max(1, min(most, elements // max(1, per_sample_elements)))


def _by_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              index: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Layer by layer from each layer's input and output gradient; None if a layer ran twice."""
    layers = {m: f"{name}." if name else "" for name, m in model.named_modules()
              if list(m.parameters(recurse=False))}
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    per_sample = max((m.weight.numel() for m in layers if isinstance(m, nn.Conv2d)), default=1)
    for take in index.split(_chunk_size(3 * per_sample, HOOKS_CHUNK)):
        seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.append((module, inputs[0].detach(), output))

        handles = [m.register_forward_hook(keep) for m in layers]
        try:
            loss = F.cross_entropy(model(x[take]), y[take], reduction="sum")
        finally:
            for handle in handles:
                handle.remove()
        if len({id(m) for m, _, _ in seen}) != len(seen):
            return None
        outputs = [out for _, _, out in seen]
        for (module, a, _), d in zip(seen, torch.autograd.grad(loss, outputs)):
            weight, bias = _layer_squares(module, a.float(), d.float())
            totals[layers[module] + "weight"] += weight
            if module.bias is not None:
                totals[layers[module] + "bias"] += bias
    return totals


def _layer_squares(module: nn.Module, a: torch.Tensor,
                   d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the chunk of squared per-sample gradients of one layer's weight and bias, from
    its input `a` and the gradient `d` of the summed loss with respect to its output."""
    if isinstance(module, nn.Linear):
        if a.dim() == 2:  # one vector per sample: factorizes
            return d.square().T @ a.square(), d.square().sum(0)
        a, d = a.flatten(1, -2), d.flatten(1, -2)  # several positions per sample
        per_sample = torch.bmm(d.transpose(1, 2), a)
        return per_sample.square().sum(0), d.sum(1).square().sum(0)
    columns = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    d = d.flatten(2)  # samples x out channels x positions
    per_sample = torch.bmm(d, columns.transpose(1, 2))
    return per_sample.square().sum(0).view_as(module.weight), d.sum(2).square().sum(0)


def _by_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             index: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def log_likelihood(p, xi, yi):
        return -F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    size = _chunk_size(sum(p.numel() for p in params.values()), VMAP_CHUNK)
    for take in index.split(size):
        for n, g in per_sample(params, x[take], y[take]).items():
            totals[n] += g.float().square().sum(0)
    return totals

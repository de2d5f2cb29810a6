"""Models, registered by name, each split into a named `body` and `head`.

Every model is a :class:`SplitModel`: `body` extracts features, `head` classifies them. Decoupling
algorithms address parameters through these two submodules (see :func:`param_roles`), never by
matching substrings of parameter names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pflbench.core.state import state_tensors
from pflbench.errors import UserError

ModelBuilder = Callable[[tuple[int, int, int], int], "SplitModel"]
MODELS: dict[str, ModelBuilder] = {}
ROLES = ("body", "head")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return decorate


class SplitModel(nn.Module):
    """`head(body(x))`; `channels_last` marks conv nets that run faster in that memory format."""

    def __init__(self, body: nn.Module, head: nn.Module, channels_last: bool = False):
        super().__init__()
        self.body = body
        self.head = head
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def param_roles(model: SplitModel) -> dict[str, str]:
    """Map every state tensor of the model (its parameters and normalization statistics, see
    :mod:`pflbench.core.state`) to 'body' or 'head', from the submodule it lives in."""
    roles = {}
    for role in ROLES:
        for name, _ in state_tensors(getattr(model, role), prefix=role):
            roles[name] = role
    return roles


def norm_state_keys(model: nn.Module) -> tuple[str, ...]:
    """Names of the state tensors of the model's BatchNorm layers (affine weight and bias, running
    mean and variance), found by module type."""
    keys = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys.extend(name for name, _ in state_tensors(module, prefix=module_name))
    return tuple(keys)


def layer_groups(keys: tuple[str, ...]) -> list[list[str]]:
    """Parameter names grouped into layers, in model order: consecutive names of one module (its
    weight and bias). Algorithms that act per layer (FedALA's top layers, LG-FedAvg's shared
    layers) count layers this way."""
    layers: list[list[str]] = []
    for key in keys:
        module = key.rsplit(".", 1)[0]
        if layers and layers[-1][0].rsplit(".", 1)[0] == module:
            layers[-1].append(key)
        else:
            layers.append([key])
    return layers


def _flat_size(body: nn.Module, input_shape: tuple[int, int, int], model_name: str) -> int:
    try:
        with torch.no_grad():
            body.eval()  # a probe, not data: BatchNorm statistics must not move
            return int(body(torch.zeros(1, *input_shape)).shape[1])
    except RuntimeError:
        raise UserError(f"model '{model_name}' does not fit {input_shape[1]}x{input_shape[2]} inputs; "
                        "use --model mlp (or --model auto)") from None


@register_model("fedavgcnn")
def fedavgcnn(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """The CNN of McMahan et al. (2017) as used by FL-bench and FedOBP: two 5x5 convs, fc 512."""
    convs = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    flat = _flat_size(convs, input_shape, "fedavgcnn")
    body = nn.Sequential(*convs, nn.Linear(flat, 512), nn.ReLU())
    return SplitModel(body, nn.Linear(512, num_classes), channels_last=True)


@register_model("fedavgcnn_bn")
def fedavgcnn_bn(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """`fedavgcnn` with a BatchNorm layer after each convolution (before its ReLU), for
    algorithms about normalization statistics (FedBN). The running mean and variance are state
    and travel with their layer's role (see :mod:`pflbench.core.state`). The 512-unit layer has no
    BatchNorm1d: a client whose last mini-batch holds one sample would make it fail in training,
    and the convolutions' BatchNorm2d normalizes over the spatial positions too, so it never does."""
    convs = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    flat = _flat_size(convs, input_shape, "fedavgcnn_bn")
    body = nn.Sequential(*convs, nn.Linear(flat, 512), nn.ReLU())
    return SplitModel(body, nn.Linear(512, num_classes), channels_last=True)


@register_model("lenet5")
def lenet5(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; padding keeps 28x28 inputs at 28."""
    convs = nn.Sequential(
        nn.Conv2d(input_shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    flat = _flat_size(convs, input_shape, "lenet5")
    body = nn.Sequential(*convs, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    return SplitModel(body, nn.Linear(84, num_classes), channels_last=True)


@register_model("mlp")
def mlp(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """Two hidden layers of 200 units (McMahan et al. 2017's 2NN)."""
    flat = input_shape[0] * input_shape[1] * input_shape[2]
    body = nn.Sequential(nn.Flatten(), nn.Linear(flat, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU())
    return SplitModel(body, nn.Linear(200, num_classes))


@register_model("smallcnn_bn")
def smallcnn_bn(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """A two-convolution net with BatchNorm for small images (digits' 8x8, where fedavgcnn_bn's
    5x5 convolutions do not fit): 3x3 convs of 32 and 64 channels (padding 1), each followed by
    BatchNorm2d, ReLU and 2x2 max pooling, then fc 200; the head is linear. What `auto` gives an
    algorithm that needs BatchNorm on small images."""
    convs = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    flat = _flat_size(convs, input_shape, "smallcnn_bn")
    body = nn.Sequential(*convs, nn.Linear(flat, 200), nn.ReLU())
    return SplitModel(body, nn.Linear(200, num_classes), channels_last=True)


BATCHNORM_VARIANTS = {"mlp": "smallcnn_bn", "fedavgcnn": "fedavgcnn_bn"}


def batchnorm_variant(name: str) -> str:
    """The BatchNorm model standing in for `name` where an algorithm needs one (a sweep's grid
    model for FedBN); `auto` and models without a variant are returned unchanged."""
    return BATCHNORM_VARIANTS.get(name, name)


def auto_model_name(input_shape: tuple[int, int, int], needs: str | None = None) -> str:
    """fedavgcnn (the FedOBP protocol's model) where images are large enough, else mlp (digits is
    8x8); for an algorithm that needs BatchNorm layers (`Algorithm.model_needs = "batchnorm"`),
    their BatchNorm versions fedavgcnn_bn and smallcnn_bn."""
    large = min(input_shape[1:]) >= 16
    if needs == "batchnorm":
        return "fedavgcnn_bn" if large else "smallcnn_bn"
    return "fedavgcnn" if large else "mlp"


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                needs: str | None = None) -> SplitModel:
    """The model `name`; `auto` picks by the input size and what the algorithm `needs`."""
    if name == "auto":
        name = auto_model_name(input_shape, needs)
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of auto, {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape, num_classes)

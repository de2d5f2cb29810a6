"""Models, registered by name, each split into a named `body` and `head`.

Every model is a :class:`SplitModel`: `body` extracts features, `head` classifies them. Decoupling
algorithms address parameters through these two submodules (see :func:`param_roles`), never by
matching substrings of parameter names.
"""

from __future__ import annotations

from collections import OrderedDict
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


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 2 groups, the `norm_layer` of the ResNets below (every ResNet-18 width,
    64 to 512 channels, is even)."""
    return nn.GroupNorm(2, channels)


def _resnet18_split(input_shape: tuple[int, int, int], num_classes: int, cifar_stem: bool) -> SplitModel:
    """torchvision's ResNet-18 with GroupNorm, its stem taking `input_shape[0]` channels, split
    into `body` (stem, the four stages, global average pooling and flatten: 512 features) and
    `head` (torchvision's own final `Linear(512, num_classes)`). The body keeps torchvision's
    module names (`conv1`, `bn1`, `layer1.0.bn1`, ...: the GroupNorm layers sit where BatchNorm
    did), so a torchvision state-dict key names the same tensor under `body.`."""
    from torchvision.models import resnet18 as torchvision_resnet18  # lazy: importing torchvision is slow

    net = torchvision_resnet18(weights=None, num_classes=num_classes, norm_layer=_group_norm)
    channels = input_shape[0]
    if cifar_stem or channels != 3:
        # a new stem conv: the CIFAR stem (He et al. 2016, section 4.2; kuangliu's pytorch-cifar),
        # a 3x3 stride-1 conv without the max pooling, keeps 32x32 inputs at 32x32 into layer1,
        # where the ImageNet stem would shrink them to 8x8; or the ImageNet stem's 7x7 stride-2
        # conv for a channel count other than torchvision's 3
        size, stride = (3, 1) if cifar_stem else (7, 2)
        net.conv1 = nn.Conv2d(channels, 64, size, stride=stride, padding=size // 2, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    stem = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu)]
    if not cifar_stem:
        stem.append(("maxpool", net.maxpool))
    body = nn.Sequential(OrderedDict([
        *stem, ("layer1", net.layer1), ("layer2", net.layer2), ("layer3", net.layer3),
        ("layer4", net.layer4), ("avgpool", net.avgpool), ("flatten", nn.Flatten()),
    ]))
    return SplitModel(body, net.fc, channels_last=True)


@register_model("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """ResNet-18 (He et al. 2016) with GroupNorm in place of BatchNorm and the CIFAR stem (a 3x3
    stride-1 conv, no max pooling), for 32x32 images and down to 8x8 (digits), with any number of
    channels; randomly initialized. Federated ResNets use GroupNorm because BatchNorm's batch
    statistics differ between non-IID clients and do not average into a working model (Hsieh et
    al., ICML 2020, "The Non-IID Data Quagmire"); GroupNorm normalizes each sample on its own and
    has no running statistics, so its state is its parameters. 2 groups in every layer, the
    setting Hsieh et al. use and Reddi et al. (ICLR 2021, Adaptive Federated Optimization)
    adopted from them for their federated ResNet-18 on CIFAR-10 (FL-bench's ResNets are
    torchvision's, with BatchNorm). No BatchNorm variant (`batchnorm_variant` returns the name
    unchanged): FedBN, which needs BatchNorm layers, refuses it with a one-line error, as it does
    lenet5. Not an `auto` choice."""
    return _resnet18_split(input_shape, num_classes, cifar_stem=True)


def _imagenet_resnet18_state() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet-18 weights (IMAGENET1K_V1), from torch's cache or downloaded
    into it; a one-line UserError where neither works (no network)."""
    from torchvision.models import ResNet18_Weights

    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as error:  # URLError and HTTPError are OSErrors
        raise UserError(
            "resnet18_pretrained needs torchvision's ImageNet weights, which could not be downloaded "
            f"({type(error).__name__}); connect once so torch caches them in {torch.hub.get_dir()}, "
            "or use --model resnet18") from None


@register_model("resnet18_pretrained")
def resnet18_pretrained(input_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """`resnet18`'s network with the ImageNet stem (7x7 stride-2 conv and max pooling, the one
    the weights were trained with), its body initialized from torchvision's ImageNet ResNet-18
    (IMAGENET1K_V1): the convolutions' weights load as they are, and each BatchNorm layer's
    affine weight and bias become the weight and bias of the GroupNorm in its place (same shape);
    BatchNorm's running mean and variance have no GroupNorm counterpart and are dropped, so the
    loaded body does not compute the ImageNet network's features exactly: it is a starting point
    for training, not a frozen feature extractor. The head is fresh (`num_classes`
    outputs; ImageNet's 1000-class fc is not used). For inputs without 3 channels the stem's RGB
    filters are summed over the colour axis and spread evenly over the input's channels (for 1
    channel: the sum, which responds to a grey image as the RGB filters did). Needs the weights
    in torch's cache or a network connection (else a UserError); no other model does."""
    model = _resnet18_split(input_shape, num_classes, cifar_stem=False)
    state = _imagenet_resnet18_state()
    with torch.no_grad():
        for name, param in model.body.named_parameters():
            value = state[name]
            if name == "conv1.weight" and value.shape != param.shape:
                value = value.sum(dim=1, keepdim=True).div(param.shape[1]).expand_as(param)
            param.copy_(value)
    return model


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

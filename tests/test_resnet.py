"""ResNet-18 with GroupNorm (`resnet18`) and its ImageNet-initialized version
(`resnet18_pretrained`), without a network: the weights' download is replaced in each test."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
from torch import nn

from pflbench.core.models import MODELS, build_model, norm_state_keys, param_roles
from pflbench.core.state import state_tensors
from pflbench.errors import UserError


@pytest.fixture(scope="module")
def cifar_model():
    return build_model("resnet18", (3, 32, 32), 10)


@pytest.fixture
def imagenet_state(monkeypatch):
    """A random state dict shaped like torchvision's ImageNet ResNet-18, served by the weights'
    loader in place of the download."""
    import torchvision.models

    torch.manual_seed(0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, *a, **kw: state)
    return state


def test_both_names_are_registered():
    assert {"resnet18", "resnet18_pretrained"} <= set(MODELS)


def test_shapes_for_rgb_and_grey_inputs(cifar_model):
    assert cifar_model.channels_last
    with torch.no_grad():
        features = cifar_model.body(torch.randn(2, 3, 32, 32))
        assert features.shape == (2, 512) and cifar_model.head(features).shape == (2, 10)
        grey = build_model("resnet18", (1, 28, 28), 62)
        assert grey.body.conv1.in_channels == 1
        assert grey(torch.randn(2, 1, 28, 28)).shape == (2, 62)
        assert build_model("resnet18", (1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_cifar_stem_and_head(cifar_model):
    conv1 = cifar_model.body.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar_model.modules())
    head = cifar_model.head
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (512, 10)
    assert list(cifar_model.children())[-1] is head


def test_groupnorm_only_so_the_state_is_the_parameters(cifar_model):
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cifar_model.modules())
    norms = [m for m in cifar_model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and all(m.num_groups == 2 for m in norms)
    assert norm_state_keys(cifar_model) == ()
    assert [n for n, _ in state_tensors(cifar_model)] == [n for n, _ in cifar_model.named_parameters()]
    assert sum(p.numel() for p in cifar_model.parameters()) == 11_173_962


def test_roles_split_body_and_head(cifar_model):
    roles = param_roles(cifar_model)
    assert set(roles) == {n for n, _ in cifar_model.named_parameters()}
    assert {n for n, r in roles.items() if r == "head"} == {"head.weight", "head.bias"}
    assert all(n.startswith("body.") for n, r in roles.items() if r == "body")
    assert "body.layer1.0.bn1.weight" in roles


def test_one_training_step_runs():
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.head.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(model.head.weight, before)


def test_pretrained_maps_batchnorm_affine_into_groupnorm_and_keeps_convs(imagenet_state):
    model = build_model("resnet18_pretrained", (3, 32, 32), 10)
    body = model.body
    assert body.conv1.kernel_size == (7, 7) and isinstance(body.maxpool, nn.MaxPool2d)
    assert isinstance(body.layer1[0].bn1, nn.GroupNorm)
    assert torch.equal(body.layer1[0].bn1.weight, imagenet_state["layer1.0.bn1.weight"])
    assert torch.equal(body.layer1[0].bn1.bias, imagenet_state["layer1.0.bn1.bias"])
    assert torch.equal(body.layer2[0].downsample[1].weight, imagenet_state["layer2.0.downsample.1.weight"])
    assert torch.equal(body.layer3[1].conv2.weight, imagenet_state["layer3.1.conv2.weight"])
    for name, param in body.named_parameters():  # every body tensor comes from the weights
        assert torch.equal(param, imagenet_state[name]), name
    assert model.head.weight.shape == (10, 512)  # fresh, not ImageNet's 1000-class fc
    assert norm_state_keys(model) == ()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pretrained_grey_stem_sums_the_rgb_filters(imagenet_state):
    model = build_model("resnet18_pretrained", (1, 28, 28), 10)
    expected = imagenet_state["conv1.weight"].sum(dim=1, keepdim=True)
    assert model.body.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(model.body.conv1.weight, expected)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pretrained_without_network_is_one_line_user_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, wherever the real one is full
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as caught:
        build_model("resnet18_pretrained", (3, 32, 32), 10)
    message = str(caught.value)
    assert "\n" not in message
    assert "could not be downloaded (URLError)" in message and "--model resnet18" in message

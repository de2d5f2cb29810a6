"""The shared empirical-Fisher helper (pflbench.core.fisher): both methods equal a loop of
per-sample gradients, and `auto` falls back to vmap wherever the hooks would be wrong."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.fisher import hooks_apply, squared_sample_grads
from pflbench.core.models import fedavgcnn, fedavgcnn_bn, mlp


def per_sample_loop(model, x, y):
    """The definition: one backward pass per sample, its gradient squared, summed."""
    totals = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            totals[n] += g.square()
    return totals


class Strided(nn.Module):
    """A strided, dilated, padded convolution and a linear layer applied at every position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2)
        self.pointwise = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # samples x positions x channels
        return self.head(torch.relu(self.pointwise(h)).mean(1))


class Twice(nn.Module):
    """One linear layer applied twice: its per-sample gradient sums two terms."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.layer(torch.tanh(self.layer(x.flatten(1)))))


def case(name):
    torch.manual_seed(0)
    if name == "fedavgcnn":
        return fedavgcnn((1, 28, 28), 10), torch.randn(13, 1, 28, 28), torch.randint(10, (13,))
    if name == "mlp":
        return mlp((1, 8, 8), 10), torch.randn(13, 1, 8, 8), torch.randint(10, (13,))
    if name == "strided":
        return Strided(), torch.randn(9, 2, 9, 9), torch.randint(3, (9,))
    if name == "bn":
        model = fedavgcnn_bn((1, 28, 28), 10)
        model.train()
        model(torch.randn(64, 1, 28, 28))  # running statistics that are not the identity
        return model, torch.randn(7, 1, 28, 28), torch.randint(10, (7,))
    return Twice(), torch.randn(7, 6), torch.randint(3, (7,))


def assert_matches(result, expected):
    assert list(result) == list(expected)
    for n in expected:
        torch.testing.assert_close(result[n], expected[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["fedavgcnn", "mlp", "strided"])
@pytest.mark.parametrize("method", ["hooks", "vmap", "auto"])
def test_both_methods_equal_a_loop_of_per_sample_gradients(name, method):
    model, x, y = case(name)
    model.eval()
    assert hooks_apply(model)
    index = torch.arange(len(x)).flip(0)  # any order, any subset of rows
    result = squared_sample_grads(model, x, y, index, method=method)
    assert_matches(result, per_sample_loop(model, x, y))


def test_hooks_use_small_chunks_without_changing_the_sum(monkeypatch):
    model, x, y = case("fedavgcnn")
    model.eval()
    monkeypatch.setattr("pflbench.core.fisher.HOOKS_CHUNK", (1, 256))  # one sample per chunk
    result = squared_sample_grads(model, x, y, torch.arange(len(x)), method="hooks")
    assert_matches(result, per_sample_loop(model, x, y))


def test_auto_takes_vmap_for_batchnorm_and_matches_the_loop():
    model, x, y = case("bn")
    model.eval()
    assert not hooks_apply(model)
    result = squared_sample_grads(model, x, y, torch.arange(len(x)))
    assert_matches(result, per_sample_loop(model, x, y))


def test_a_layer_run_twice_falls_back_to_vmap_and_hooks_refuse_it():
    model, x, y = case("twice")
    assert hooks_apply(model)  # only a forward pass shows it
    result = squared_sample_grads(model, x, y, torch.arange(len(x)))
    assert_matches(result, per_sample_loop(model, x, y))
    with pytest.raises(ValueError, match="once per forward pass"):
        squared_sample_grads(model, x, y, torch.arange(len(x)), method="hooks")


def test_a_parameter_shared_by_two_layers_is_not_for_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert not hooks_apply(model)


def test_an_unknown_method_is_refused():
    model, x, y = case("mlp")
    with pytest.raises(ValueError, match="auto, hooks or vmap"):
        squared_sample_grads(model, x, y, torch.arange(2), method="loop")

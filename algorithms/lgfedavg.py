"""LG-FedAvg: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov and Morency, "Think
Locally, Act Globally: Federated Learning with Local and Global Representations",
arXiv:2001.01523, 2020 (code: github.com/pliang279/LG-FedAvg).

Schedule: each sampled client trains the whole model for `local_epochs` of SGD from its own
personal layers and the global shared layers; only the shared layers are sent and averaged
(sample-weighted), the personal layers stay on the client. A client that has not trained yet
starts its personal layers from the global model's copy of them, which the server never changes
after the warm-up (so: the initial model, or the warm-up's result). Evaluation: the global shared
layers under the client's own personal layers (nothing is trained at evaluation).

Which layers are shared (`global_layers`). A layer is a module holding parameters (its weight and
bias together), in the model's order (parameter names grouped by their module, `layer_groups`, the
grouping FedALA uses):
- `head` (default): the model's `head` submodule is global, the `body` personal: the paper's
  "local representations, global model on top" (and how PFLlib splits it);
- `first`: the first `num_global` layers are global, every other layer personal: FL-bench's
  LG-FedAvg (src/client/lgfedavg.py: the first `num_global_layers` = 1 of the model's Conv2d,
  BatchNorm2d and Linear modules in `named_modules` order are global), which is what the FedOBP
  authors ran (their fork, github.com/uglyghost/FedOBP, keeps that client unchanged);
- `last`: the last `num_global` layers are global: the authors' code (main_lg.py shares the last
  `num_layers_keep` entries of the model's `weight_keys`, default 1; its README runs 3 for the
  MNIST MLP and 2 for the CIFAR CNN). With the models here, whose head is one linear layer,
  `last` with `num_global=1` shares exactly what `head` shares.

Warm-up (`warmup_rounds` = K): the authors' code runs LG-FedAvg from a FedAvg model (its README
trains 400 MNIST or 1200 CIFAR-10 FedAvg rounds first). Here the first K rounds are plain FedAvg:
the whole model down, the whole model up, everything averaged, nothing kept (so a run of K rounds
is exactly FedAvg, metrics and bytes). From round K + 1 the split applies and every client's
personal layers start from the global model after the warm-up; a client's first LG round
therefore downloads the whole model once (its personal layers come from the server), later rounds
only the shared layers. FL-bench and PFLlib run no warm-up, hence the default 0.

Communication: down the shared layers (the whole model during the warm-up and at a client's first
LG round after one), up the shared layers (the whole model during the warm-up).

Hyperparameters:
    global_layers = head   head | first | last (see above); the paper's reading is the default.
    num_global = 1         layers shared by `first` and `last` (FL-bench's `num_global_layers`
                           and the authors' `num_layers_keep` both default to 1); must stay 1
                           with `head`. At most the model's number of layers (all: FedAvg).
    warmup_rounds = 0      FedAvg rounds before the split (FL-bench, PFLlib: none).

Where the implementations differ: the authors' code averages the shared layers without sample
weights (FL-bench and this benchmark weight by training samples), starts from the FedAvg
checkpoint with the best test accuracy (here the warm-up's last global model), and keeps, per
client, the local model with the best test accuracy so far for evaluation (here every client is
evaluated with its current model). Its CIFAR CNN lists its layers as fc1, fc2, fc3, conv2, conv1,
so there "the last two" are the two convolutions; here `last` counts in the model's order
(`first` with `num_global=2` shares the two convolutions of such a model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pflbench.core.algorithm import Algorithm
from pflbench.core.models import layer_groups
from pflbench.errors import UserError
from pflbench.core.registry import register_algorithm
from pflbench.core.state import State, subset


@register_algorithm("lgfedavg")
class LGFedAvg(Algorithm):
    description = "Some layers personal (local representations), the others shared and averaged."
    citation = "Liang et al., arXiv:2001.01523, 2020"
    client_state = "its personal layers (those global_layers={global_layers} leaves out)"
    personal = "body"

    @dataclass
    class Hyperparams:
        global_layers: Literal["head", "first", "last"] = "head"
        num_global: int = 1
        warmup_rounds: int = 0

        def __post_init__(self):
            if self.num_global < 1:
                raise ValueError(f"num_global must be >= 1 (got {self.num_global})")
            if self.global_layers == "head" and self.num_global != 1:
                raise ValueError(f"num_global applies to global_layers=first or last; with head it "
                                 f"must stay 1 (got {self.num_global})")
            if self.warmup_rounds < 0:
                raise ValueError(f"warmup_rounds must be >= 0 (got {self.warmup_rounds})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)  # `personal = "body"`: the head is shared
        self.layers = layer_groups(self.all_keys)
        if hp.global_layers != "head":
            if hp.num_global > len(self.layers):
                raise UserError(f"lgfedavg: num_global={hp.num_global}, but the model has only "
                                f"{len(self.layers)} layers; use --hp num_global=1..{len(self.layers)}")
            chosen = self.layers[:hp.num_global] if hp.global_layers == "first" else self.layers[-hp.num_global:]
            shared = {k for layer in chosen for k in layer}
            self.shared_keys = tuple(k for k in self.all_keys if k in shared)
            self.personal_keys = tuple(k for k in self.all_keys if k not in shared)
        self.warm = hp.warmup_rounds > 0
        self.started: set[int] = set()  # clients that have had an LG round

    def begin_round(self, round_: int, sampled: list[int]) -> None:
        self.warm = round_ <= self.hp.warmup_rounds

    def download_keys(self, cid: int) -> tuple[str, ...]:
        if self.warm or (self.hp.warmup_rounds > 0 and cid not in self.started):
            return self.all_keys  # the warm-up's model, personal layers included
        return self.shared_keys

    def client_start(self, cid: int, global_state: State) -> State:
        if self.warm:
            return global_state
        self.started.add(cid)
        return super().client_start(cid, global_state)

    def upload(self, cid: int, trained: State) -> State:
        if self.warm:
            return subset(trained, self.all_keys)
        return super().upload(cid, trained)

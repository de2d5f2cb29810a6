"""MOON: Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021 (arXiv:2103.16257;
the authors' code: github.com/QinbinLi/MOON).

FedAvg whose local objective adds a model-level contrastive term on the representation z of a
sample: z should be closer (in cosine similarity) to the representation the received global model
gives the same sample than to the one the client's previous local model gives it.

Round t, for each sampled client i:
1. Down: the whole global model w^t (as FedAvg).
2. Local training: `local_epochs` of the run's SGD (fresh optimizer, the "train" batch stream, so
   the batches are FedAvg's) on every parameter, each mini-batch with the loss

       CE(head(z), y) + mu * mean_b -log( exp(cos(z, z_glob) / tau)
                                          / (exp(cos(z, z_glob) / tau) + exp(cos(z, z_prev) / tau)) )

   where z = body(x) (the projection's output with `proj_dim` > 0, see below) from the model
   being trained, z_glob from w^t and z_prev from the client's previous local model (both
   frozen: forward passes only, no gradient). The second term is computed as
   softplus((cos(z, z_prev) - cos(z, z_glob)) / tau), the same value, stably.
3. Up: the whole trained model; the client also keeps it as its next "previous model". The server
   takes the sample-weighted mean (FedAvg).
Evaluation: every client is tested with the global model (MOON is not personalized; `eval_adapt`
none); `--finetune-epochs K` of the engine gives the fine-tuned `_ft` figures.

The representation. The paper (and the authors' code, `ModelFedCon`) adds a projection head, a
two-layer MLP from the base encoder's features (Linear(D, D), ReLU, Linear(D, 256)), contrasts its
output and puts the classifier on top of it. PFLlib (system/flcore/clients/clientmoon.py: `rep =
self.model.base(x)`) and FL-bench (src/client/moon.py: `get_last_features`, the classifier's
input) add no projection head and contrast the body's output. The default follows PFLlib and
FL-bench (`proj_dim = 0`): the benchmark's model stays the one every other algorithm trains, so
MOON differs from FedAvg by its loss alone. `proj_dim = P > 0` is the paper's architecture: the
model's head becomes Linear(D, D), ReLU, Linear(D, P) (the projection, whose output is contrasted)
followed by Linear(P, classes); its parameters are head parameters, shared and averaged like the
rest (the authors use P = 256). D is read from the model (`head.in_features`).

A client's previous model. The paper's Algorithm 1 uses the client's local model of the previous
round; the authors' code keeps a pool of every party's last trained network (buffer size 1), so a
party sampled now contrasts with the model it last trained, whichever round that was; as here.
(Its option of several previous models as negatives, `model_buffer_size` > 1, is not offered.)
A client that has never trained has none; the references differ:
  first = "global" (default; FL-bench, src/client/moon.py): the previous model is the global
      model just received. Then z_prev = z_glob, the term is the constant log 2 and its gradient
      is exactly zero, so it is left out (the update is the same; the reported training loss
      lacks the constant mu * log 2). The authors' first round has no negative at all (a
      contrastive loss over one logit, i.e. zero): the same update.
  first = "init": the initial model w^0, the same for every client (PFLlib, where each client's
      `old_model` starts as a copy of the initial model): in round 1 it equals the global model
      (the term is inert as above); later, a first-time client is pushed away from w^0. (With
      partial participation, the authors' code makes a party sampled for the first time after
      round 1 contrast with its own untrained network, initialized apart from the global model:
      closest to this option.)

Hyperparameters:
  mu = 5.0       weight of the contrastive term. The paper tunes mu in {0.1, 1, 5, 10}; its best is
                 5 on CIFAR-10 (1 on CIFAR-100 and Tiny-ImageNet); 5 is FL-bench's default
                 (src/server/moon.py) and the value of the authors' README example. PFLlib's
                 command line default is mu = 0 (its generic `-mu`, shared by several methods).
                 mu = 0 is exactly FedAvg (same batches; the term adds exact zeros).
  tau = 0.5      temperature: the paper, the authors' code (`--temperature 0.5`) and FL-bench;
                 PFLlib's default is 1.0.
  proj_dim = 0   0: no projection head (PFLlib, FL-bench); P > 0: the paper's projection head with
                 output size P (the authors' 256).
  first = global what a client that has never trained uses as its previous model (see above).

Search space (`pflbench tune`, beside the run's learning rate): mu in [0.1, 10], log scale: the
range of the paper's grid {0.1, 1, 5, 10}. tau is not searched (every reference fixes 0.5 or 1).

Memory: the previous local model of every client that has trained (one whole model per client,
kept by the client; 2,328,104 bytes for fedavgcnn on Fashion-MNIST, the same as one upload), two
scratch models for the frozen forward passes, and w^0 with `first = init`.
Communication: the whole model down and up, exactly FedAvg's bytes (the previous model never
travels: it is the model the client trained itself).
Compute: the trained model's forward and backward pass counts once per sample (`Trainer.sgd`);
the global and previous models' forward passes are not gradients and are not counted, so
`grad_evals` equals FedAvg's while a round costs about two more forward passes per sample.
Measured (`benchmarks/bench_algorithms.py`, 2026-11-26, one thread of this project's 2-core CPU, other core idle): 1.5x to 1.7x FedAvg's time per sample-gradient, about what two extra forward
passes (each roughly a third of a forward and backward pass) predict: the contrastive term needs
the global and previous models' representations of every batch, so the cost is the method's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, set_state
from pflbench.core.training import LossFn, TrainStats, stream_seed
from pflbench.errors import UserError


class ProjectedHead(nn.Module):
    """The paper's head: a projection MLP (Linear(D, D), ReLU, Linear(D, P)) whose output is the
    contrasted representation, then the classifier Linear(P, classes) on it."""

    def __init__(self, in_features: int, proj_dim: int, num_classes: int, generator: torch.Generator,
                 device: torch.device):
        super().__init__()

        def linear(n_in: int, n_out: int) -> nn.Linear:  # allocated without drawing from the global RNG
            return skip_init(nn.Linear, n_in, n_out, device=device)

        self.project = nn.Sequential(linear(in_features, in_features), nn.ReLU(), linear(in_features, proj_dim))
        self.out = linear(proj_dim, num_classes)
        with torch.no_grad():  # PyTorch's linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), seeded
            for layer in (self.project[0], self.project[2], self.out):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).mul(2).sub(1).mul(bound))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.project(z))


@register_algorithm("moon")
class MOON(Algorithm):
    description = "FedAvg with a model-contrastive term: z near the global model's, away from the previous local model's."
    citation = "Li, He and Song, CVPR 2021"
    client_state = "its previous local model (the last model it trained, a whole model)"

    @dataclass
    class Hyperparams:
        mu: float = tunable(5.0, Real(0.1, 10.0, log=True))
        tau: float = 0.5
        proj_dim: int = 0
        first: Literal["global", "init"] = "global"

        def __post_init__(self):
            if not (self.mu >= 0 and math.isfinite(self.mu)):
                raise ValueError(f"mu must be a finite number >= 0 (got {self.mu})")
            if not (self.tau > 0 and math.isfinite(self.tau)):
                raise ValueError(f"tau must be a finite number > 0 (got {self.tau})")
            if self.proj_dim < 0:
                raise ValueError(f"proj_dim must be >= 0 (0: no projection head; got {self.proj_dim})")
            if self.first not in ("global", "init"):
                raise ValueError(f"first must be global or init (got {self.first})")

    def __init__(self, ctx, hp):
        if hp.proj_dim > 0:
            head = ctx.model.head
            if not isinstance(head, nn.Linear):
                raise UserError("moon with proj_dim > 0 needs a model whose head is one linear layer")
            gen = torch.Generator().manual_seed(stream_seed(ctx.config.seed, "moon-projection"))
            ctx.model.head = ProjectedHead(head.in_features, hp.proj_dim, ctx.num_classes, gen,
                                           head.weight.device)
        super().__init__(ctx, hp)
        self.previous: dict[int, State] = {}  # client -> the last model it trained (client side)
        self.initial: State | None = get_state(ctx.model) if hp.first == "init" else None
        self.global_net = self._frozen_copy(ctx.model)
        self.previous_net = self._frozen_copy(ctx.model)

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        net = copy.deepcopy(model)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval()

    def representation(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, logits) of `model` on `x`: the contrasted representation and the class scores, from
        one forward pass (z is the body's output, or the projection's with `proj_dim > 0`)."""
        features = model.body(x)
        if self.hp.proj_dim > 0:
            z = model.head.project(features)
            return z, model.head.out(z)
        return features, model.head(features)

    def previous_state(self, cid: int) -> State | None:
        """The model client `cid` contrasts against: the last one it trained; before it has trained,
        none (`first = global`: the term is inert and left out) or w^0 (`first = init`)."""
        return self.previous.get(cid, self.initial)

    def local_loss(self, received: State, previous: State | None) -> LossFn:
        """CE + mu * the model-contrastive term against `received` (positive) and `previous`
        (negative); plain CE when there is no previous model."""
        if previous is None:
            def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(self.representation(model, x)[1], y)
            return plain
        set_state(self.global_net, received)
        set_state(self.previous_net, previous)
        mu, tau = self.hp.mu, self.hp.tau

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            z, logits = self.representation(model, x)
            with torch.no_grad():
                z_glob = self.representation(self.global_net, x)[0]
                z_prev = self.representation(self.previous_net, x)[0]
            z = z.flatten(1)
            positive = F.cosine_similarity(z, z_glob.flatten(1), dim=1)
            negative = F.cosine_similarity(z, z_prev.flatten(1), dim=1)
            contrastive = F.softplus((negative - positive) / tau).mean()
            return F.cross_entropy(logits, y) + mu * contrastive

        return loss_fn

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        received = get_state(model)  # w^t
        loss_fn = self.local_loss(received, self.previous_state(cid))
        return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, loss_fn=loss_fn)

    def upload(self, cid: int, trained: State) -> State:
        self.previous[cid] = dict(trained)  # kept on the client: its next round's negative
        return super().upload(cid, trained)

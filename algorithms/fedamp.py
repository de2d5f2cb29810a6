"""FedAMP: Huang, Chu, Zhou, Wang, Liu, Pei and Zhang, "Personalized Cross-Silo Federated Learning
on Non-IID Data", AAAI 2021 (arXiv:2007.03797). References: PFLlib (github.com/TsingZ0/PFLlib,
`system/flcore/clients/clientamp.py`, `servers/serveramp.py`, defaults in `system/main.py`) and
fluke (github.com/makgyver/fluke, `fluke/algorithms/fedamp.py`); no code by the paper's authors
was found to compare with.

No global model: every client i owns a model w_i; the server keeps each client's latest upload.
The paper's attentive message passing is a gradient step on sum_{i<j} A(||w_i - w_j||^2),
A(x) = 1 - exp(-x / sigma), taken by the server, followed by a proximal step on each client.

Schedule per round, for each sampled client i:
1. server (`client_start`): builds client i's personalized cloud model from what it keeps,
       u_i = sum_j xi_ij w_j,   xi_ij = alphaK * A'(||w_i - w_j||^2)  (j != i),
       xi_ii = 1 - sum_{j != i} xi_ij,     A'(x) = exp(-x / sigma) / sigma,
   computed as u_i = w_i + sum_{j != i} xi_ij (w_j - w_i) (the same sum, and exactly w_i where
   every xi_ij is 0). w_i is client i's own latest model (the initialization before its first
   round); the w_j (`pool=all`) are the latest models of every other client that has trained at
   least once, as they were at the start of the round. Squared distances run over the parameters;
   u_i combines every state tensor. u_i is sent down (one model, counted with
   `Context.count_traffic`; `download_keys` is empty: w_i stays on the client).
2. client (`local_train`): `local_epochs` of SGD (the run's optimizer, fresh) from its own model
   w_i (`start=own`) on CE + lamda / (2 alphaK) ||w - u_i||^2 (the paper's local objective, through
   `proximal_loss`; u_i is constant during training).
3. up: w_i, which the server stores as client i's latest model at the end of the round (uploads
   are held until then, so every client of a round sees the round-start models whatever the order
   in which clients train).

Clients never sampled: the server has no model of theirs, so they do not enter anyone's u_i (PFLlib
too builds u_i only from models it received), and they are evaluated with, and start from, the
shared initialization. In the first round nobody has trained: u_i = w_i = the initialization.

Evaluation: the client's own model w_i as last trained (PFLlib tests `client.model`), the
initialization for a client that never trained. Nothing is adapted at test time.

Memory per client: its latest model (one model: server side in this simulation; it is also the
client's own), plus, within a round, the uploads of the round's sampled clients until the round
ends and the u_i being trained against. fedavgcnn on FMNIST (582,026 parameters): 2,328,104 bytes
per client. Communication per sampled client and round: one model down (u_i), one model up (w_i),
as FedAvg. Compute: `local_epochs` passes over the training samples (counted); the server's u_i
costs one distance and one axpy per model it holds (not sample-gradients).

Hyperparameters (the defaults are PFLlib's, `system/main.py`; this file does not use values from
the paper's experiments):
    alphaK = 1.0   step of the message-passing gradient step (PFLlib `-alk`). xi_ii >= 0 needs
                   alphaK * sum_j A'(.) <= 1, which nothing enforces (neither reference clips xi).
                   With the defaults on digits (mlp, 6 clients, 1 epoch a round) the squared
                   distances between models are below 1 and xi_ii is negative: -0.5 on average
                   with half the clients joining (3 rounds), -3.8 with all joining (2 rounds).
                   u_i then lies beyond the others' models, away from w_i. `summary.json` reports the run's mean
                   and minimum xi_ii (`amp_self_weight_mean`, `amp_self_weight_min`).
    lamda = 1.0    weight of the attentive term (PFLlib `-lam`); the client's proximal coefficient
                   is lamda / alphaK. lamda = 0 is exactly Local (tested).
    sigma = 1.0    scale of A (PFLlib `-sg`). With sigma small against the squared distances
                   between models, every xi_ij underflows to 0, u_i = w_i, and the method is Local
                   with a proximal term to its own starting point (tested).
    pool = all     whose models enter u_i: `all`, every client's latest model (the paper's
                   u_i over all clients, under partial participation); `last_round`, only the
                   models uploaded in the previous round (PFLlib's `uploaded_models`).
    start = own    where local training starts: `own`, the client's own model (PFLlib and fluke
                   train their persistent model with u_i as the anchor only); `cloud`, u_i itself
                   (the paper's local step is an exact proximal minimization, which does not name a
                   starting point).

Where the references differ and this file does not follow them: PFLlib's current client adds
0.5 * lamda / alphaK * ||w - u_i|| (not squared) computed from `p.data`, which carries no gradient,
so its local training is plain CE (in PFLlib issue #95 a user reports FedAMP accuracy curves
identical to Local's); its 2021-22 versions used the squared norm with a gradient, as the paper
and this file do. fluke uses the learning rate in place of alphaK in the proximal coefficient.

Search space (`pflbench tune`, beside the run's learning rate): alphaK, lamda and sigma each in
[0.1, 10], log scale, a decade either side of PFLlib's 1.0 (no grid from the paper is used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.regularizers import proximal_loss
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, nbytes
from pflbench.core.training import TrainStats


def attention_weights(sq_distances: list[float], alphaK: float, sigma: float) -> tuple[float, list[float]]:
    """(xi_ii, [xi_ij]) for the squared distances ||w_i - w_j||^2 to the other models:
    xi_ij = alphaK * exp(-d / sigma) / sigma, xi_ii = 1 - sum_j xi_ij."""
    others = [alphaK * math.exp(-d / sigma) / sigma for d in sq_distances]
    return 1.0 - sum(others), others


@register_algorithm("fedamp")
class FedAMP(Algorithm):
    description = ("The server sends each client an attention-weighted mix of the clients' models; the client "
                   "trains its own model with a proximal pull to that mix.")
    citation = "Huang et al., AAAI 2021"
    personal = "all"
    client_state = "its latest model (the server keeps it and mixes it into the others' cloud models)"
    eval_adapt = "none"

    @dataclass
    class Hyperparams:
        alphaK: float = tunable(1.0, Real(0.1, 10.0, log=True))
        lamda: float = tunable(1.0, Real(0.1, 10.0, log=True))
        sigma: float = tunable(1.0, Real(0.1, 10.0, log=True))
        pool: Literal["all", "last_round"] = "all"
        start: Literal["own", "cloud"] = "own"

        def __post_init__(self):
            if not self.alphaK > 0:
                raise ValueError(f"alphaK must be > 0 (got {self.alphaK})")
            if not self.lamda >= 0:
                raise ValueError(f"lamda must be >= 0 (got {self.lamda})")
            if not self.sigma > 0:
                raise ValueError(f"sigma must be > 0 (got {self.sigma})")
            if self.pool not in ("all", "last_round"):
                raise ValueError(f"pool must be 'all' or 'last_round' (got {self.pool!r})")
            if self.start not in ("own", "cloud"):
                raise ValueError(f"start must be 'own' or 'cloud' (got {self.start!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.model_bytes = nbytes(get_state(ctx.model))
        self.models: dict[int, State] = {}  # client -> its latest model, as at the round's start
        self.last_round: list[int] = []  # the clients that uploaded in the previous round
        self.cloud: dict[int, State] = {}  # client -> its u_i, from client_start to local_train
        self.self_weights: list[float] = []

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return ()  # u_i is not the global state: counted in client_start

    def pool(self, cid: int) -> list[int]:
        ids = sorted(self.models) if self.hp.pool == "all" else self.last_round
        return [j for j in ids if j != cid]

    def sq_distance(self, a: State, b: State) -> float:
        return sum(float((a[k] - b[k]).double().square().sum()) for k in self.param_keys)

    @torch.no_grad()
    def cloud_model(self, cid: int, own: State) -> State:
        """u_i = w_i + sum_{j != i} xi_ij (w_j - w_i) over the round-start models of the pool."""
        others = self.pool(cid)
        xi_self, xi = attention_weights([self.sq_distance(own, self.models[j]) for j in others],
                                        self.hp.alphaK, self.hp.sigma)
        if others:
            self.self_weights.append(xi_self)
        cloud = {k: v.clone() for k, v in own.items()}
        for j, x in zip(others, xi):
            if x != 0.0:
                for k, v in cloud.items():
                    v.add_(self.models[j][k] - own[k], alpha=x)
        return cloud

    def client_start(self, cid: int, global_state: State) -> State:
        own = self.models.get(cid, global_state)
        cloud = self.cloud_model(cid, own)
        self.ctx.count_traffic(down=self.model_bytes)
        self.cloud[cid] = cloud
        return own if self.hp.start == "own" else cloud

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        cloud = self.cloud.pop(cid)
        trainer = self.ctx.trainer
        if self.hp.lamda == 0:
            return trainer.sgd(model, cid, self.ctx.config.local_epochs, round_)
        anchor = {k: cloud[k] for k in self.param_keys}
        return trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                           loss_fn=proximal_loss(anchor, self.hp.lamda / self.hp.alphaK))

    def upload(self, cid: int, trained: State) -> State:
        return trained

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        acc.extra.setdefault("models", {})[upload.cid] = upload.payload

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        uploaded = acc.extra.get("models", {})
        self.models.update(uploaded)
        self.last_round = sorted(uploaded)
        return global_state  # the initialization, for clients that never trained

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.models.get(cid, global_state)

    def summary(self) -> dict[str, float]:
        if not self.self_weights:
            return {}
        return {"amp_self_weight_mean": sum(self.self_weights) / len(self.self_weights),
                "amp_self_weight_min": min(self.self_weights)}

"""pFedMe: T. Dinh, Tran and Nguyen, "Personalized Federated Learning with Moreau Envelopes",
NeurIPS 2020.

Bi-level problem: each client's personalized model is the proximal point
theta_k(w) = argmin_theta CE_k(theta) + lam/2 ||theta - w||^2, and the local model w descends the
Moreau envelope, whose gradient is lam * (w - theta_k(w)).

Schedule per sampled client (the paper's Algorithm 1): w_local starts as the received global
model w^t and theta as a copy of it. For every mini-batch of `local_epochs` passes over the
client's data (the "train" stream):
  1. K = `k` gradient steps on theta, the batch fixed, with step `personal_lr` and no momentum:
     theta <- theta - personal_lr * (grad CE(theta; batch) + lam * (theta - w_local)),
     warm-started from the previous batch's theta (as the authors' code, FL-bench and PFLlib);
  2. w_local <- w_local - lr * lam * (w_local - theta): one step of the run's optimizer (lr,
     momentum, weight decay; plain as in the paper with the defaults momentum = weight decay = 0)
     on the envelope gradient.
The client uploads w_local; the server sets w <- (1 - beta) w + beta * mean(w_local), the mean
sample-weighted as FedAvg's (so beta = 1 is exactly FedAvg's aggregation). The last theta is
kept per client.

Evaluation (`eval=personal`, default): each client is tested with its kept theta, the
personalized model the paper reports (its "pFedMe (PM)"); a client that has not trained yet
uses the current global model, which is where its theta would start. `eval=global` tests every
client with the global model (the paper's "pFedMe (GM)"). The reported training loss is
CE(theta) on each batch before its K steps.

Hyperparameters:
    lam = 15           the paper's regularization for its MNIST experiments (FL-bench's default).
                       Stability needs lr * lam < 2 and personal_lr * lam < 2.
    k = 5              inner steps per batch (the paper's K = 5; FL-bench and PFLlib default 5).
                       k = 0 leaves theta at w^t, so the envelope gradient is exactly zero and the
                       client returns exactly what it received.
    personal_lr = 0.01 inner step size (FL-bench and PFLlib default).
    beta = 1.0         server mixing; 1 is plain averaging, the paper also reports beta = 2.
    eval = personal    see above.

Differences from the paper:
- The paper has every client run local updates each round and a subset of S aggregated; here
  only the sampled clients train (as in FL-bench and PFLlib), so a client's theta is from its
  last participation.
- The paper's R local rounds each draw one mini-batch; here the client passes `local_epochs`
  times over its data (R = local_epochs * batches per epoch), like the other algorithms here.
- The paper averages the S uploaded models uniformly; here the mean is sample-weighted, as
  FedAvg's in this benchmark (FL-bench and PFLlib do the same).
- FL-bench's inner solver also adds a weight decay mu * theta (mu = 1e-3 by default), which is
  not in the paper; there is none here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pflbench.algorithm import Algorithm, Upload
from pflbench.registry import register_algorithm
from pflbench.state import State, get_state, set_state, weighted_mean
from pflbench.training import TrainStats, cross_entropy


@register_algorithm("pfedme")
class PFedMe(Algorithm):
    description = "Personal model = proximal point of the local loss; local model descends its Moreau envelope."
    citation = "T. Dinh et al., NeurIPS 2020"

    @dataclass
    class Hyperparams:
        lam: float = 15.0
        k: int = 5
        personal_lr: float = 0.01
        beta: float = 1.0
        eval: Literal["personal", "global"] = "personal"

        def __post_init__(self):
            if not self.lam >= 0:
                raise ValueError(f"lam must be >= 0 (got {self.lam})")
            if self.k < 0:
                raise ValueError(f"k must be >= 0 (got {self.k})")
            if not self.personal_lr > 0:
                raise ValueError(f"personal_lr must be > 0 (got {self.personal_lr})")
            if not self.beta >= 0:
                raise ValueError(f"beta must be >= 0 (got {self.beta})")
            if self.eval not in ("personal", "global"):
                raise ValueError(f"eval must be personal or global (got {self.eval})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.personal_models: dict[int, State] = {}
        self.theta_model = copy.deepcopy(ctx.model)

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def client_start(self, cid: int, global_state: State) -> State:
        return global_state

    @torch.no_grad()
    def _inner_step(self, theta: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
                    local: list[torch.Tensor]) -> None:
        lam, lr = self.hp.lam, self.hp.personal_lr
        for t, g, w in zip(theta, grads, local):
            t.add_(g + lam * (t - w), alpha=-lr)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer = self.ctx.trainer
        theta_model = self.theta_model
        set_state(theta_model, get_state(model))  # theta starts at w^t
        theta_model.train()
        names = [n for n, _ in model.named_parameters()]
        local = [p for _, p in model.named_parameters()]
        theta = [dict(theta_model.named_parameters())[n] for n in names]
        outer = trainer.optimizer(local)  # the run's optimizer on w_local, fresh each round
        loss_sum = torch.zeros((), device=self.ctx.device)
        samples = 0
        for xb, yb in trainer.batches(cid, self.ctx.config.local_epochs, round_, purpose="train"):
            if self.hp.k == 0:
                with torch.no_grad():
                    loss_sum += cross_entropy(theta_model, xb, yb) * len(yb)
            for step in range(self.hp.k):
                loss = cross_entropy(theta_model, xb, yb)
                grads = torch.autograd.grad(loss, theta)
                self._inner_step(theta, grads, local)
                if step == 0:
                    loss_sum += loss.detach() * len(yb)
            samples += len(yb)
            trainer.count_grads(len(yb), passes=self.hp.k)  # the K inner steps on this batch
            outer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for w, t in zip(local, theta):
                    w.grad = (w - t).mul_(self.hp.lam)  # gradient of the Moreau envelope
            outer.step()
        outer.zero_grad(set_to_none=True)
        self.personal_models[cid] = get_state(theta_model)
        return TrainStats(loss_sum=float(loss_sum), samples=samples)

    def upload(self, cid: int, trained: State) -> State:
        return trained

    @torch.no_grad()
    def aggregate(self, uploads: list[Upload], global_state: State) -> State:
        """w <- (1 - beta) w + beta * (sample-weighted mean of the uploaded local models)."""
        if not uploads:
            return global_state
        mean = weighted_mean([u.payload for u in uploads], [u.n_train for u in uploads])
        beta = self.hp.beta
        return {k: global_state[k].mul(1.0 - beta).add_(mean[k], alpha=beta) if k in mean else global_state[k]
                for k in global_state}

    def eval_state(self, cid: int, global_state: State) -> State:
        if self.hp.eval == "global":
            return global_state
        return self.personal_models.get(cid, global_state)

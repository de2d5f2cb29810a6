"""pFedMe: T. Dinh, Tran and Nguyen, "Personalized Federated Learning with Moreau Envelopes",
NeurIPS 2020.

Bi-level problem: each client's personalized model is the proximal point
theta_k(w) = argmin_theta CE_k(theta) + lam/2 ||theta - w||^2, and the local model w descends the
Moreau envelope, whose gradient is lam * (w - theta_k(w)).

Schedule per sampled client (the paper's Algorithm 1): w_local starts as the received global
model w^t and theta as a copy of it. For every mini-batch of `local_epochs` passes over the
client's data (the "train" stream):
  1. K = `k` gradient steps on theta, the batch fixed, with step `personal_lr` and no momentum:
     theta <- theta - personal_lr * (grad CE(theta; batch) + lam * (theta - w_local) + mu * theta),
     warm-started from the previous batch's theta (as the authors' code, FL-bench and PFLlib);
  2. one step of w_local along the envelope gradient lam * (w_local - theta):
     `outer=plain` (default): w_local <- w_local - lr * lam * (w_local - theta), a plain step with
     the run's `--lr` (no momentum, no weight decay); `outer=run`: one step of the run's optimizer
     (lr, momentum, weight decay; fresh each round) on that gradient.
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
    mu = 0.0           weight decay of the inner step (the term mu * theta above). The paper's
                       inner problem, min_theta f_i(theta) + lam/2 ||theta - w||^2, has no such
                       term, so the default is 0. Its authors' code (github.com/CharlieDinh/pFedMe,
                       pFedMeOptimizer), FL-bench (src/client/pfedme.py, pFedMeOptimizer; --mu
                       1e-3) and PFLlib (clientpFedMe.py with fedoptimizer.pFedMeOptimizer, whose
                       default mu = 0.001 the client never overrides) all add it to the inner
                       gradient exactly as above with mu = 1e-3: `mu=0.001` reproduces them.
    outer = plain      the paper's outer step (Algorithm 1: w <- w - eta * lam * (w - theta)),
                       which the authors' code, FL-bench and PFLlib all write as a plain update
                       with the run's learning rate, whatever the run's optimizer settings (in
                       FL-bench the run's optimizer object is never used by pFedMe's training).
                       With the run's default momentum = weight decay = 0 the two choices are the
                       same, bit for bit. They differ where the run sets momentum or weight
                       decay: in the FMNIST grid (momentum 0.7, the FedOBP protocol, which runs
                       on FL-bench) `plain` steps w_local by exactly lr * lam * (w_local - theta)
                       per batch, as pFedMe ran in that protocol, while `run` accumulates those
                       envelope gradients in a momentum buffer (0.7, fresh each round), like the
                       model steps of FedAvg in that grid.
    eval = personal    see above.

Differences from the paper:
- The paper has every client run local updates each round and a subset of S aggregated; here
  only the sampled clients train (as in FL-bench and PFLlib), so a client's theta is from its
  last participation.
- The paper's R local rounds each draw one mini-batch; here the client passes `local_epochs`
  times over its data (R = local_epochs * batches per epoch), like the other algorithms here.
- The paper averages the S uploaded models uniformly; here the mean is sample-weighted, as
  FedAvg's in this benchmark (FL-bench and PFLlib do the same).

Search space (`pflbench tune`, beside the run's learning rate): lam in [1, 30], log scale, up to
twice the paper's MNIST value (trials with lr * lam >= 2 diverge and are recorded as failed);
personal_lr in [0.001, 0.1], log scale, a decade either side of the references' 0.01.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, set_state
from pflbench.core.training import TrainStats, cross_entropy


@register_algorithm("pfedme")
class PFedMe(Algorithm):
    description = "Personal model = proximal point of the local loss; local model descends its Moreau envelope."
    citation = "T. Dinh et al., NeurIPS 2020"
    client_state = "a personal model"

    @dataclass
    class Hyperparams:
        lam: float = tunable(15.0, Real(1.0, 30.0, log=True))
        k: int = 5
        personal_lr: float = tunable(0.01, Real(0.001, 0.1, log=True))
        beta: float = 1.0
        eval: Literal["personal", "global"] = "personal"
        mu: float = 0.0
        outer: Literal["plain", "run"] = "plain"

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
            if not self.mu >= 0:
                raise ValueError(f"mu must be >= 0 (got {self.mu})")
            if self.outer not in ("plain", "run"):
                raise ValueError(f"outer must be plain or run (got {self.outer})")

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
        """theta <- theta - personal_lr * (grad + lam * (theta - w_local) + mu * theta)."""
        lam, lr, mu = self.hp.lam, self.hp.personal_lr, self.hp.mu
        for t, g, w in zip(theta, grads, local):
            step = g + lam * (t - w)
            if mu:
                step = step + mu * t
            t.add_(step, alpha=-lr)

    @torch.no_grad()
    def _plain_outer_step(self, local: list[torch.Tensor], theta: list[torch.Tensor]) -> None:
        """w_local <- w_local - lr * (lam * (w_local - theta)): the paper's step, the run's lr."""
        lam, lr = self.hp.lam, self.ctx.config.lr
        for w, t in zip(local, theta):
            w.add_((w - t).mul_(lam), alpha=-lr)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer = self.ctx.trainer
        theta_model = self.theta_model
        set_state(theta_model, get_state(model))  # theta starts at w^t
        theta_model.train()
        names = [n for n, _ in model.named_parameters()]
        local = [p for _, p in model.named_parameters()]
        theta = [dict(theta_model.named_parameters())[n] for n in names]
        # outer=run: the run's optimizer on w_local, fresh each round
        outer = trainer.optimizer(local) if self.hp.outer == "run" else None
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
            if outer is None:
                self._plain_outer_step(local, theta)
                continue
            outer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for w, t in zip(local, theta):
                    w.grad = (w - t).mul_(self.hp.lam)  # gradient of the Moreau envelope
            outer.step()
        if outer is not None:
            outer.zero_grad(set_to_none=True)
        self.personal_models[cid] = get_state(theta_model)
        return TrainStats(loss_sum=float(loss_sum), samples=samples)

    def upload(self, cid: int, trained: State) -> State:
        return trained

    @torch.no_grad()
    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        """w <- (1 - beta) w + beta * (sample-weighted mean of the uploaded local models), the mean
        streamed by the default hooks."""
        mean = acc.mean.result()
        if not mean:
            return global_state
        beta = self.hp.beta
        return {k: global_state[k].mul(1.0 - beta).add_(mean[k], alpha=beta) if k in mean else global_state[k]
                for k in global_state}

    def eval_state(self, cid: int, global_state: State) -> State:
        if self.hp.eval == "global":
            return global_state
        return self.personal_models.get(cid, global_state)

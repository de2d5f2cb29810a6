"""FedDyn: Acar, Zhao, Matas Navarro, Mattina, Whatmough and Saligrama, "Federated Learning Based on
Dynamic Regularization", ICLR 2021 (arXiv:2111.04263; the authors' code is
github.com/alpemreacar/FedDyn).

A global method, here as a reference point for the personalized ones: every client is tested with
the server model theta^t (`eval_adapt` is "none"; the engine's `--finetune-epochs K` adds
fine-tuned `_ft` figures to it as to any algorithm).

State: every client k keeps its gradient state grad_k (the paper's nabla L_k(theta_k^{t-1}), one
tensor per parameter, zero at the start); the server keeps h (parameter-shaped, zero at the start).
A model's normalization statistics (BatchNorm running mean and variance, where it has them) are
not trained by gradient, so no regularizer or correction applies to them: they travel with the
model and are averaged.

Schedule per round t, for each sampled client k (S the sampled set, N the run's clients):

1. down: theta^{t-1} (the model only).
2. local: from theta^{t-1}, `local_epochs` of the run's SGD (fresh optimizer, "train" batch stream,
   as FedAvg) on the dynamically regularized objective
       L_k(theta) - <grad_k, theta> + alpha/2 ||theta - theta^{t-1}||^2,
   whose extra gradient alpha (theta - theta^{t-1}) - grad_k is added to each mini-batch's
   cross-entropy gradient before the optimizer's step (so the run's momentum and weight decay act
   on it as on a gradient). Clipping, as the authors' code does it (utils_general.py,
   `train_feddyn_mdl`, max_norm = 10): the cross-entropy gradient plus the linear part
   -grad_k - alpha theta^{t-1} is clipped to norm `max_grad_norm`, then alpha theta is added (the
   authors pass alpha to SGD as weight decay, which is applied after the clip). The reported
   training loss is the cross-entropy alone.
3. client update: grad_k <- grad_k - alpha (theta_k - theta^{t-1}) (the paper's first-order
   condition); up: theta_k (the model only).
4. server: h <- h - alpha (1/N) sum_{k in S} (theta_k - theta^{t-1}), then
   theta^t = mean_S(theta_k) - h / alpha, the mean plain over S (every sampled client weighs 1) as
   in the paper's Algorithm 1, the authors' code (`np.mean` over the selected clients) and PFLlib;
   `weighting=samples` weights it by training samples, as FL-bench (FedAvg's aggregation) and this
   benchmark's FedAvg. h stays the mean over all N clients of grad_k (the paper's invariant).

Aggregation streams: the models go into the engine's running mean, their differences from
theta^{t-1} into one running sum kept beside it.

Memory: one gradient state (one model-sized set of tensors) per client that has trained, plus h on
the server (for fedavgcnn on Fashion-MNIST, 582,026 parameters: 2.33 MB per client).
Communication per sampled client and round: one model down and one up, exactly FedAvg's.

Hyperparameters:
    alpha = 0.01           the regularization weight: the authors' code (example_cifar_10.py,
                           alpha_coef = 1e-2), the middle of the paper's grid {0.1, 0.01, 0.001}.
                           FL-bench defaults to 0.1 (src/server/feddyn.py); PFLlib has no FedDyn
                           default of its own, it reads the shared `-al/--alpha` flag, 1.0
                           (system/main.py).
    max_grad_norm = 10.0   the clipping threshold above: the authors' code (max_norm = 10, for every
                           method it runs) and FL-bench (`max_grad_norm` 10). 0 disables clipping:
                           the paper's Algorithm 1 and PFLlib.
    weighting = "uniform"  the mean over S: "uniform" (paper, authors, PFLlib) or "samples".

Where the references differ, beyond the defaults above:
- The authors' code divides alpha, per client, by n_k / mean(n) (smaller alpha for larger clients)
  and adds a general weight decay of 1e-3 to every method; the first is not implemented (it is the
  identity on balanced data), the second is the run's `--weight-decay`.
- PFLlib (system/flcore/clients/clientdyn.py) adds alpha/2 ||theta - theta^{t-1}|| with the norm
  not squared, so its pull has constant length alpha/2 instead of alpha ||theta - theta^{t-1}||;
  we follow the paper.
- FL-bench (src/client/feddyn.py) trains CE + alpha <theta, nabla_k - theta^{t-1}>, whose quadratic
  pull alpha theta exists only if its optimizer's weight decay is set to alpha (its default is 0);
  we follow the paper and the authors' code.

Search space (`pflbench tune`, beside the run's learning rate): alpha in [0.001, 0.1], log scale: the
range of the paper's grid, also one decade either side of the authors' default 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State
from pflbench.core.training import TrainStats

WEIGHTINGS = ("uniform", "samples")


class DynamicSGD(torch.optim.SGD):
    """The run's SGD on FedDyn's local objective: each step adds the constant `linear` term
    (-grad_k - alpha theta^{t-1}, one tensor per parameter, in the order of `params`) to the
    gradient, clips the sum to `max_norm` (if > 0), adds `alpha` theta, then steps."""

    def __init__(self, params: list[torch.Tensor], linear: list[torch.Tensor], alpha: float,
                 max_norm: float, **settings):
        super().__init__(params, **settings)
        self.linear = linear
        self.alpha = alpha
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        for p, lin in zip(self.param_groups[0]["params"], self.linear):
            if p.grad is not None:
                p.grad.add_(lin)
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        for p in params:
            p.grad.add_(p, alpha=self.alpha)
        return super().step(closure)


@register_algorithm("feddyn")
class FedDyn(Algorithm):
    description = "Local objective with a dynamic linear and quadratic regularizer; server corrects by h; global model."
    citation = "Acar et al., ICLR 2021"
    eval_adapt = "none"
    client_state = "its gradient state (one tensor per parameter; the server keeps h)"

    @dataclass
    class Hyperparams:
        alpha: float = tunable(0.01, Real(1e-3, 1e-1, log=True))
        max_grad_norm: float = 10.0
        weighting: Literal["uniform", "samples"] = "uniform"

        def __post_init__(self):
            if not (self.alpha > 0 and self.alpha < float("inf")):
                raise ValueError(f"alpha must be a finite number > 0 (got {self.alpha})")
            if not (self.max_grad_norm >= 0 and self.max_grad_norm < float("inf")):
                raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping) (got {self.max_grad_norm})")
            if self.weighting not in WEIGHTINGS:
                raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)} (got {self.weighting!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        # the regularizer acts on the trained parameters (a normalization statistic, which has no
        # gradient, is averaged as FedAvg does)
        params = dict(ctx.model.named_parameters())
        self.h: State = {k: torch.zeros_like(params[k]) for k in self.param_keys}
        self.grad_state: dict[int, State] = {}  # absent: zero (the paper's start)
        self.received: State = {}  # theta^{t-1}, as the client being trained received it

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def gradient_state(self, cid: int) -> State:
        """Client `cid`'s gradient state grad_k (zero before its first round)."""
        g = self.grad_state.get(cid)
        return g if g is not None else {k: torch.zeros_like(v) for k, v in self.h.items()}

    def client_start(self, cid: int, global_state: State) -> State:
        self.received = global_state
        return global_state

    @torch.no_grad()
    def _linear(self, cid: int, names: list[str]) -> list[torch.Tensor]:
        """-grad_k - alpha theta^{t-1}: the constant part of the local objective's gradient."""
        g, x, alpha = self.grad_state.get(cid), self.received, self.hp.alpha
        if g is None:
            return [x[n] * -alpha for n in names]
        return [(x[n] * -alpha).sub_(g[n]) for n in names]

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        names = [n for n, _ in model.named_parameters()]
        trainer = self.ctx.trainer
        opt = DynamicSGD(list(model.parameters()), self._linear(cid, names), self.hp.alpha,
                         self.hp.max_grad_norm, lr=trainer.lr, momentum=trainer.momentum,
                         weight_decay=trainer.weight_decay)
        return trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, optimizer=opt)

    @torch.no_grad()
    def upload(self, cid: int, trained: State) -> State:
        """grad_k <- grad_k - alpha (theta_k - theta^{t-1}); send theta_k."""
        x, alpha = self.received, self.hp.alpha
        g = self.grad_state.get(cid)
        step = {n: (trained[n] - x[n]).mul_(alpha) for n in self.param_keys}
        self.grad_state[cid] = {n: (g[n] - step[n]) if g is not None else step[n].neg_() for n in self.param_keys}
        return trained

    # -- aggregation ------------------------------------------------------------------------------
    def aggregation_weight(self, cid: int, n_train: int) -> float:
        return 1.0 if self.hp.weighting == "uniform" else n_train

    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        acc = super().begin_aggregation(global_state, expected)
        acc.extra.update(start=global_state, drift={})
        return acc

    @torch.no_grad()
    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """theta_k into the running mean; theta_k - theta^{t-1} into a plain sum."""
        x, drift = acc.extra["start"], acc.extra["drift"]
        for name in self.param_keys:
            value = upload.payload[name]
            if name in drift:
                drift[name].add_(value).sub_(x[name])
            else:
                drift[name] = value - x[name]
        super().accumulate(acc, upload)

    @torch.no_grad()
    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        """h <- h - alpha/N sum (theta_k - theta^{t-1}); theta^t = mean theta_k - h / alpha."""
        alpha, n_clients = self.hp.alpha, len(self.ctx.participants)
        for name, total in acc.extra["drift"].items():
            self.h[name] = self.h[name] - total * (alpha / n_clients)
        mean = acc.mean.result()
        return {**global_state, **mean, **{n: mean[n] - h / alpha for n, h in self.h.items()}}

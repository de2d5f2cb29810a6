"""APFL: Deng, Kamani and Mahdavi, "Adaptive Personalized Federated Learning",
arXiv:2003.13461, 2020.

Every client i keeps a personal model v_i and a mixing weight alpha_i in [0, 1]; its
personalized model is the mixture

    v_bar_i = alpha_i * v_i + (1 - alpha_i) * w

so **alpha weights the personal model** (the paper's convention): alpha = 0 is the global model,
alpha = 1 the personal one. Schedule per round (the paper's Algorithm 1), on every mini-batch of
`local_epochs` passes over the client's data (the same batches FedAvg draws), all three updates
taken at the values from before the step:

    w       <- w       - lr       * grad_w     CE(w)            (the client's copy of the global model)
    v_i     <- v_i     - lr       * grad_v     CE(v_bar_i)      (= alpha_i * grad CE at v_bar_i)
    alpha_i <- alpha_i - alpha_lr * grad_alpha CE(v_bar_i),  then clipped to [0, 1]

where the mixture uses the client's current w (detached: w is trained only on its own loss).
With parameter mixing, grad_alpha = <v_i - w, grad CE(v_bar_i)>, the paper's formula; autograd
computes it. Only w is uploaded and averaged (sample-weighted, as FedAvg); the server sends the
whole global model, so the communication is FedAvg's: the whole model both ways. v_i and alpha_i
never leave the client. A client's v_i starts as the global model it receives at its first
participation (with every client in round 1 this is the paper's common initialization).
Evaluation uses the mixture with the *current* global model, alpha_i * v_i + (1 - alpha_i) * w,
loaded into the shared model (clients that never trained: the global model).

Because w trains exactly as FedAvg does, alpha = 0 with `learn_alpha=false` evaluates the global
model and the run is FedAvg exactly (tested); the issue's "mixing weight 1 evaluates the global
model" is the same property under the opposite convention (weight on the global model).

Hyperparameters:
- `alpha` (0.5): initial (or, with `learn_alpha=false`, fixed) alpha_i; 0.5 is the default of
  the authors' code (FedTorch) and FL-bench, the neutral midpoint.
- `learn_alpha` (true): adapt alpha_i by its gradient, the paper's "adaptive" APFL.
- `alpha_lr` (-1 = the run's `--lr`): step size of the alpha update; the paper's Algorithm 1
  uses one step size for w, v and alpha. The alpha gradient sums over every parameter, so this
  is an aggressive rate: training from a random start, w (full-rate steps) gets ahead of v
  (alpha-scaled steps), the gradient pushes alpha down, and a client whose alpha reaches 0 keeps
  it there (v then gets no gradient). On digits (MLP, lr 0.01 to 0.05, 15 rounds) some clients'
  alpha ended at 0; `alpha_lr=0.001` kept every alpha near 0.5 and did as well as a fixed alpha.
- `mix` (`params`): `params` mixes parameters as in the paper; `logits` mixes the two models'
  outputs, alpha * v(x) + (1 - alpha) * w(x) with w(x) detached, as the authors' code (FedTorch),
  FL-bench and the evaluation of both do; alpha's gradient is then the true derivative of that
  loss.

Where published implementations differ from the paper: FedTorch (the authors' code) and FL-bench
mix outputs, not parameters, yet update alpha with the parameter-space formula plus a 0.02 * alpha
term, and only on the first step of a round (FedTorch) or during the first epoch (FL-bench);
PFLlib trains v_i on its own loss CE(v_i), not on the mixture, and overwrites v_i with the
mixture after each round. Here: the paper's update, at every step, without the extra term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.state import State, set_state
from pflbench.core.training import TrainStats


class _LogitMixture(nn.Module):
    """alpha * personal(x) + (1 - alpha) * shared(x): the predictor of `mix=logits`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.personal = copy.deepcopy(model)
        self.shared = copy.deepcopy(model)
        self.alpha = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.personal(x) + (1.0 - self.alpha) * self.shared(x)


@register_algorithm("apfl")
class APFL(Algorithm):
    description = "Each client mixes a personal model with the global one by a learned weight alpha."
    citation = "Deng et al., arXiv:2003.13461, 2020"
    eval_adapt = "mixture of the personal and the current global model by the client's alpha (no training)"

    @dataclass
    class Hyperparams:
        alpha: float = 0.5
        learn_alpha: bool = True
        alpha_lr: float = -1.0
        mix: Literal["params", "logits"] = "params"

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] (got {self.alpha})")
            if self.alpha_lr < 0 and self.alpha_lr != -1:
                raise ValueError(f"alpha_lr must be >= 0, or -1 for the run's lr (got {self.alpha_lr})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.personal: dict[int, State] = {}
        self.alphas: dict[int, float] = {}
        self._mixture: _LogitMixture | None = None

    @property
    def alpha_lr(self) -> float:
        return self.ctx.config.lr if self.hp.alpha_lr == -1 else self.hp.alpha_lr

    def alpha_of(self, cid: int) -> float:
        return self.alphas.get(cid, self.hp.alpha)

    def personal_logits(self, model: nn.Module, v: State, alpha: torch.Tensor, x: torch.Tensor,
                        logits_w: torch.Tensor) -> torch.Tensor:
        """Output of the personalized model; `logits_w` is w(x), detached."""
        if self.hp.mix == "params":
            mixed = {k: alpha * v[k] + (1 - alpha) * p.detach() for k, p in model.named_parameters()}
            return functional_call(model, mixed, (x,))
        return alpha * functional_call(model, v, (x,)) + (1 - alpha) * logits_w

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer = self.ctx.trainer
        kept = self.personal.get(cid)
        v = {k: (kept[k] if kept is not None else p.detach()).clone().requires_grad_(True)
             for k, p in model.named_parameters()}
        alpha = torch.tensor(self.alpha_of(cid), device=self.ctx.device, requires_grad=self.hp.learn_alpha)
        opt_w = trainer.optimizer(model.parameters())
        opt_v = trainer.optimizer(v.values())
        model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        samples = 0
        for x, y in trainer.batches(cid, self.ctx.config.local_epochs, round_):
            opt_w.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)
            alpha.grad = None
            logits_w = model(x)
            loss = F.cross_entropy(logits_w, y)
            loss.backward()
            F.cross_entropy(self.personal_logits(model, v, alpha, x, logits_w.detach()), y).backward()
            opt_w.step()
            opt_v.step()
            if self.hp.learn_alpha:
                with torch.no_grad():
                    alpha.sub_(alpha.grad, alpha=self.alpha_lr).clamp_(0.0, 1.0)
            loss_sum += loss.detach() * len(y)
            samples += len(y)
        trainer.count_grads(samples, passes=2)  # w's loss and the mixture's loss, every batch
        self.personal[cid] = {k: t.detach() for k, t in v.items()}
        self.alphas[cid] = float(alpha.detach())
        return TrainStats(loss_sum=float(loss_sum), samples=samples)

    def eval_state(self, cid: int, global_state: State) -> State:
        """The parameter mixture (`mix=params`); the global model for clients that never trained
        and, with `mix=logits`, for everybody (that predictor is `eval_model`'s module)."""
        v = self.personal.get(cid)
        if v is None or self.hp.mix == "logits":
            return global_state
        a = self.alpha_of(cid)
        return {k: v[k] * a + global_state[k] * (1.0 - a) for k in global_state}

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        if self.hp.mix == "params" or cid not in self.personal:
            return super().eval_model(cid, global_state)
        if self._mixture is None:
            self._mixture = _LogitMixture(self.ctx.model)
        set_state(self._mixture.personal, self.personal[cid])
        set_state(self._mixture.shared, global_state)
        self._mixture.alpha = self.alpha_of(cid)
        return self._mixture

    def summary(self) -> dict[str, float]:
        alphas = [self.alpha_of(cid) for cid in range(len(self.ctx.clients))]
        return {"alpha_mean": sum(alphas) / len(alphas), "alpha_min": min(alphas), "alpha_max": max(alphas)}

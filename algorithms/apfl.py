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
loaded into the shared model (clients that never trained: the global model). Compute: two
forward+backward passes per batch (w's loss, the mixture's loss), counted as such.

Because w trains exactly as FedAvg does, alpha held at 0 (`learn_alpha=false`, or a learned alpha
with step 0) evaluates the global model and the run is FedAvg exactly, under every alpha update
(tested).

The reference alpha update (`alpha_update=flbench` or `fedtorch`). The authors' code (FedTorch,
`fedtorch/comms/utils/flow_utils.py: alpha_update`, called from
`comms/trainings/federated/apfl.py`) and FL-bench (`src/client/apfl.py: update_alpha`) do not
use alpha's own gradient. After the step of w and the step of v on a batch they set

    g = <v_i - w, alpha_i * grad_v + (1 - alpha_i) * grad_w> + 0.02 * alpha_i,
    alpha_i <- clip(alpha_i - lr * g, 0, 1)

with v_i and w the values after their steps, grad_v the gradient of the mixture's loss in v_i,
and lr the client's SGD learning rate. They differ in grad_w and in when alpha moves:
- `flbench`: grad_w is the gradient of w's own loss CE(w); alpha moves at every step of the
  round's first local epoch (`i == 0`, i the epoch index), not in later epochs.
- `fedtorch`: grad_w is the gradient of the mixture's loss in w (w(x) enters the mixture
  attached in FedTorch, though only v is stepped with it); alpha moves once per round, at the
  first step of the first epoch (`i == 0 and ep == 0`). Computed with autograd apart from w's own
  gradient, so w's step is unchanged; with `mix=logits` that is a second backward through w on
  the round's first batch, counted as one more pass over that batch.
Here both options reproduce that rule, the 0.02 * alpha term and the schedule, applied to the
mixture this module trains (`mix`); they step alpha by `alpha_lr` (the references use the run's
lr: `alpha_lr=-1` reproduces that). What they do not reproduce: in both references w is stepped
before the mixture's forward (so v's gradient is taken at the new w; here at the old one, as in
the paper, so w and v train the same under every alpha update); FL-bench's optimizer holds w
and v in one optimizer and steps w a second time with the same gradient after v's backward; both
skip one-sample batches; FedTorch's learning rate follows its schedule.

Hyperparameters:
- `alpha` (0.5): initial (or, with `learn_alpha=false`, fixed) alpha_i; 0.5 is the default of
  the authors' code (FedTorch) and FL-bench, the neutral midpoint.
- `learn_alpha` (true): adapt alpha_i, the paper's "adaptive" APFL.
- `alpha_update` (`paper`): `paper` takes alpha's own gradient at every step (Algorithm 1);
  `flbench` and `fedtorch` the reference updates above.
- `alpha_lr` (0.005; -1 = the run's `--lr`): step size of the alpha update. The references
  step alpha by the client's learning rate, 0.01 by default in both FedTorch (`--lr`) and
  FL-bench (`optimizer.lr`), and the paper's Algorithm 1 uses one step size for w, v and alpha.
  But the paper's schedule moves alpha at every step of every local epoch, and its gradient sums
  over every parameter: at the committed grid's lr 0.01 (`grids/fmnist.toml`: FMNIST, 50
  clients, 10 per round, 30 rounds, 2 local epochs, fedavgcnn) alpha reached exactly 0 for some
  clients at Dirichlet 0.5 (alpha_min 0, alpha_max 0.9997); a client at 0 stays there (v gets
  no gradient any more). 0.005 is FL-bench's 0.01 halved: FL-bench moves alpha on the steps of
  the first of the grid's 2 epochs, the paper's schedule on the steps of both, so at half the
  rate alpha gets FL-bench's total step size per round. Measured on that grid (30 rounds, seed
  42), alpha over the 50 clients:
  Dirichlet 0.5: min 0.050, p10 0.144, p50 0.426, p90 0.541, max 0.807, none at 0 or 1 (acc
  89.21, against 88.80 at 0.01); Dirichlet 0.1: min 0.296, p10 0.377, p50 0.481, p90 0.548, max
  0.686, none at 0 or 1 (acc 93.60, against 93.40 at 0.01). The lowest alpha at Dirichlet 0.5
  still falls by about 0.015 a participation near round 30, so much longer runs may reach 0.
  A smaller rate hardly adapts: at 0.001, alpha stayed in [0.43, 0.51] after 10 rounds
  (Dirichlet 0.5); FL-bench's update at 0.01 kept it in [0.33, 0.50] (10 rounds).
- `mix` (`params`): `params` mixes parameters as in the paper; `logits` mixes the two models'
  outputs, alpha * v(x) + (1 - alpha) * w(x) with w(x) detached, as the authors' code (FedTorch),
  FL-bench and the evaluation of both do; alpha's gradient is then the true derivative of that
  loss.

Where published implementations differ from the paper, beyond the alpha update: FedTorch and
FL-bench mix outputs, not parameters (`mix=logits`); PFLlib trains v_i on its own loss CE(v_i),
not on the mixture, applies the reference formula at every step (with both gradients those of
the models' own losses), and overwrites v_i with the mixture after each round.

The summary reports the distribution of alpha over the clients that trained: `alpha_mean`,
`alpha_min`, `alpha_max`, `alpha_p10`, `alpha_p50`, `alpha_p90`, and `alpha_at_0`, `alpha_at_1`
(how many clients sit exactly at 0, where v gets no gradient any more, and at 1).

Search space (`pflbench tune`, beside the run's learning rate): alpha in [0.25, 0.75], the span of
the paper's fixed-alpha settings (0.25, 0.5, 0.75); alpha_lr in [0.001, 0.02], log scale, from the
rate measured above to hardly adapt (0.001) to twice the references' 0.01.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
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
    client_state = "a personal model and its mixing weight alpha"
    eval_adapt = "mixture of the personal and the current global model by the client's alpha (no training)"

    @dataclass
    class Hyperparams:
        alpha: float = tunable(0.5, Real(0.25, 0.75))
        learn_alpha: bool = True
        alpha_update: Literal["paper", "flbench", "fedtorch"] = "paper"
        alpha_lr: float = tunable(0.005, Real(0.001, 0.02, log=True))
        mix: Literal["params", "logits"] = "params"

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] (got {self.alpha})")
            if self.alpha_lr < 0 and self.alpha_lr != -1:
                raise ValueError(f"alpha_lr must be >= 0, or -1 for the run's lr (got {self.alpha_lr})")
            if self.alpha_update not in ("paper", "flbench", "fedtorch"):
                raise ValueError(f"alpha_update must be paper, flbench or fedtorch (got {self.alpha_update!r})")
            if self.mix not in ("params", "logits"):
                raise ValueError(f"mix must be params or logits (got {self.mix!r})")

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
                        logits_w: torch.Tensor | None, detach_w: bool = True) -> torch.Tensor:
        """Output of the personalized model. `logits_w` is w(x) (`mix=logits`; the caller passes
        it detached or not); with `mix=params`, w enters detached unless `detach_w` is false."""
        if self.hp.mix == "params":
            mixed = {k: alpha * v[k] + (1 - alpha) * (p.detach() if detach_w else p)
                     for k, p in model.named_parameters()}
            return functional_call(model, mixed, (x,))
        return alpha * functional_call(model, v, (x,)) + (1 - alpha) * logits_w

    def updates_alpha(self, step: int, steps_per_epoch: int) -> bool:
        """Whether alpha moves after local step `step` (0-based) of a round: every step (`paper`),
        the steps of the first epoch (`flbench`), the first step (`fedtorch`)."""
        if not self.hp.learn_alpha:
            return False
        if self.hp.alpha_update == "flbench":
            return step < steps_per_epoch
        if self.hp.alpha_update == "fedtorch":
            return step == 0
        return True

    @torch.no_grad()
    def step_alpha(self, alpha: torch.Tensor, model: nn.Module, v: State,
                   w_grads: list[torch.Tensor] | None) -> None:
        """One alpha update in place, after w's and v's steps of a batch, then clipped to [0, 1].
        `paper`: alpha's own gradient (autograd's, in `alpha.grad`). `flbench`/`fedtorch`: the
        reference formula <v - w, alpha * grad_v + (1 - alpha) * grad_w> + 0.02 * alpha, at the
        stepped v and w, with grad_v the mixture loss's gradient in v and grad_w `w_grads`
        (`fedtorch`: the mixture loss's gradient in w) or, if None, w's own-loss gradient
        (`flbench`)."""
        if self.hp.alpha_update == "paper":
            alpha.sub_(alpha.grad, alpha=self.alpha_lr).clamp_(0.0, 1.0)
            return
        params = list(model.parameters())
        grads_w = w_grads if w_grads is not None else [p.grad for p in params]
        a = alpha.detach()
        total = 0.02 * a
        for vk, p, gw in zip(v.values(), params, grads_w):
            total = total + ((vk - p) * (a * vk.grad + (1 - a) * gw)).sum()
        alpha.sub_(total, alpha=self.alpha_lr).clamp_(0.0, 1.0)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer = self.ctx.trainer
        kept = self.personal.get(cid)
        v = {k: (kept[k] if kept is not None else p.detach()).clone().requires_grad_(True)
             for k, p in model.named_parameters()}
        paper = self.hp.learn_alpha and self.hp.alpha_update == "paper"
        alpha = torch.tensor(self.alpha_of(cid), device=self.ctx.device, requires_grad=paper)
        opt_w = trainer.optimizer(model.parameters())
        opt_v = trainer.optimizer(v.values())
        steps_per_epoch = math.ceil(self.ctx.clients[cid].n_train / trainer.batch_size)
        model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        samples = extra = 0
        for step, (x, y) in enumerate(trainer.batches(cid, self.ctx.config.local_epochs, round_)):
            opt_w.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)
            alpha.grad = None
            update = self.updates_alpha(step, steps_per_epoch)
            # FedTorch's formula needs the mixture loss's gradient in w as well: w enters the
            # mixture attached and that gradient is taken apart from w's own (a second backward
            # through w, counted, where the mixture holds w's logits)
            through_w = update and self.hp.alpha_update == "fedtorch"
            logits_w = model(x)
            loss = F.cross_entropy(logits_w, y)
            loss.backward(retain_graph=through_w and self.hp.mix == "logits")
            mixture = F.cross_entropy(self.personal_logits(
                model, v, alpha, x, logits_w if through_w else logits_w.detach(), detach_w=not through_w), y)
            w_grads = None
            if through_w:
                grads = torch.autograd.grad(mixture, [*v.values(), *model.parameters()])
                for t, g in zip(v.values(), grads[:len(v)]):
                    t.grad = g
                w_grads = list(grads[len(v):])
                if self.hp.mix == "logits":
                    extra += len(y)
            else:
                mixture.backward()
            opt_w.step()
            opt_v.step()
            if update:
                self.step_alpha(alpha, model, v, w_grads)
            loss_sum += loss.detach() * len(y)
            samples += len(y)
        trainer.count_grads(samples, passes=2)  # w's loss and the mixture's loss, every batch
        trainer.count_grads(extra)  # FedTorch's gradient of the mixture in w (mix=logits)
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
        # tensors the personal model lacks (BatchNorm statistics) are the global model's
        return {k: v[k] * a + g * (1.0 - a) if k in v else g for k, g in global_state.items()}

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        if self.hp.mix == "params" or cid not in self.personal:
            return super().eval_model(cid, global_state)
        if self._mixture is None:
            self._mixture = _LogitMixture(self.ctx.model)
        set_state(self._mixture.personal, self.personal[cid])
        set_state(self._mixture.shared, global_state)
        self._mixture.alpha = self.alpha_of(cid)
        return self._mixture

    def summary(self) -> dict[str, float | int]:
        """The distribution of alpha over the clients that trained: mean, extremes, quantiles
        and how many sit exactly at 0 (global model only) and at 1 (personal model only)."""
        if not self.alphas:
            return {}
        a = np.array(list(self.alphas.values()), dtype=np.float64)
        p10, p50, p90 = np.quantile(a, [0.1, 0.5, 0.9])
        return {"alpha_mean": float(a.mean()), "alpha_min": float(a.min()), "alpha_max": float(a.max()),
                "alpha_p10": float(p10), "alpha_p50": float(p50), "alpha_p90": float(p90),
                "alpha_at_0": int((a == 0.0).sum()), "alpha_at_1": int((a == 1.0).sum())}

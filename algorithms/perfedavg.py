"""Per-FedAvg: Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020.

The global model w is trained for the MAML objective F(w) = mean_i f_i(w - alpha * grad f_i(w)):
every client should do well after one gradient step of size `alpha` from w on its own data.
Schedule per round (the paper's Algorithm 1): one local step per mini-batch of `local_epochs`
passes over the client's data, each step with independent batches D, D' (and D'' for HF):

    temp = w - alpha * grad f(w; D)                              (plain gradient step)
    fo:  w <- w - beta * grad f(temp; D')
    hf:  w <- w - beta * (I - alpha * H(w; D'')) grad f(temp; D')

with the Hessian-vector product of HF by finite differences, as in the paper:
H(w; D'') g ~ [grad f(w + delta g; D'') - grad f(w - delta g; D'')] / (2 delta). D' is the batch
stream FedAvg trains on; D and D'' are independent shuffles of the same data. The outer step uses
the run's optimizer settings (momentum, weight decay; fresh each round) with learning rate beta;
the inner step is the plain step of the objective. The whole model travels both ways; the server
averages the sampled clients' models uniformly (the paper: w = 1/|A| sum_i w_i), or weighted by
samples with `weighting=samples`.

Evaluation (`eval_adapt_mode`):
- `steps` (default): client i is tested with the model reached by `eval_steps` plain gradient
  steps of size `alpha` from the global model, w <- w - alpha * grad f_i(w; B_j), each on its own
  mini-batch B_j of the client's training data (`batch_size` samples): the first `eval_steps`
  batches of a fixed shuffle (the "perfedavg-eval" stream, the same at every evaluation), so the
  evaluation is read-only and deterministic. `eval_steps` = 1 is the paper's evaluation: its
  objective is the loss after one step of size alpha, and its experiments test each user's model
  after one step of stochastic gradient descent on its own data.
- `epoch`: FL-bench's adaptation (its server forces finetune_epoch >= 1 for Per-FedAvg, and its
  client's finetune() runs that many epochs of the client's optimizer over its training loader):
  one epoch over the client's training data (the first epoch of the same fixed shuffle) with a
  fresh optimizer of the run's settings: the run's `--lr` (not alpha), momentum and weight
  decay. FL-bench's inner step uses that same optimizer, so its alpha is the run's lr; set
  alpha = lr to match it in training too. `eval_steps` is ignored in this mode.
Each adaptation step is one counted gradient pass over its batch (`eval_grad_evals`).

Exact property (tested): with alpha = 0, temp = w, both variants reduce to SGD with learning rate
beta on FedAvg's batches and evaluation to the global model, so with beta = lr and sample
weighting the run is FedAvg exactly.

Hyperparameters:
- `variant` (`fo`): first-order Per-FedAvg (the cheaper variant; FL-bench's default); `hf` for
  the Hessian-free one. Each local step costs 2 (fo) or 4 (hf) gradient evaluations.
- `alpha` (0.01): the personalization step size; our choice, a typical SGD step for the models
  here (not tied to `--lr`, because it is part of the objective).
- `beta` (-1 = the run's `--lr`): the outer (meta) step size; tying it to `--lr` keeps the global
  model's step comparable with FedAvg's and makes alpha = 0 FedAvg.
- `delta` (1e-4): finite-difference radius of HF; the paper only asks it to be small. FL-bench
  uses 1e-3, but on ReLU nets that radius crosses activation kinks: on digits' MLP the product at
  1e-3 had cosine 0.3 to 0.9 with autograd's exact Hessian-vector product, while 1e-4 down to
  1e-5 matched it (cosine 1.000, float32).
- `weighting` (`uniform`): server average, the paper's uniform mean, or `samples`.
- `eval_steps` (1): adaptation steps at evaluation, the paper's one step (see Evaluation).
- `eval_adapt_mode` (`steps`): `steps`, the paper's alpha-steps; `epoch`, FL-bench's epoch.

Where published implementations differ from the paper: FL-bench (src/client/perfedavg.py) uses
the run's optimizer and lr as the inner step and `beta` (default 0.001) as the outer one, takes
len(loader) // 2 (or // 3) steps per epoch, and evaluates after fine-tuning a full epoch with the
run's optimizer (the `epoch` mode here). PFLlib (system/flcore/clients/clientperavg.py) restores
w before the outer step, as the paper does: per step it takes one loader batch of 2 x batch_size
training samples, makes a plain step of the run's lr on its first half (D), computes the gradient
at temp on its second half (D'), copies w back and steps w <- w - beta * grad f(temp; D'), with
beta = the run's lr (so alpha = beta = lr); its server calls every sampled client's train() twice
per round. Its evaluation (evaluate_one_step with the client's train_one_step) takes one plain
step of the run's lr from the received global model on one shuffled training batch of
batch_size samples, tests, and puts the model back: the paper's one-step evaluation with
alpha = lr, on a batch redrawn at every evaluation. Here: the paper's update, one step per batch
of FedAvg's schedule, evaluation one alpha-step on a fixed training batch (or the options above).

Search space (`pflbench tune`, beside the run's learning rate): alpha in [0.001, 0.1], log scale, a
decade either side of the default.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, set_state
from pflbench.core.training import TrainStats

EVAL_STREAM = "perfedavg-eval"


@register_algorithm("perfedavg")
class PerFedAvg(Algorithm):
    description = "MAML-style FedAvg: the global model is trained to be good after one local step."
    citation = "Fallah et al., NeurIPS 2020"
    newcomer = "the global model after the adaptation step every client takes at test time"
    eval_adapt = ("{eval_steps} gradient step(s) (alpha={alpha}) from the global model, each on its own "
                  "fixed training batch")
    eval_adapt_epoch = ("one epoch of the run's SGD (lr, momentum, weight decay) from the global model on the "
                        "training data")

    @dataclass
    class Hyperparams:
        variant: Literal["fo", "hf"] = "fo"
        alpha: float = tunable(0.01, Real(0.001, 0.1, log=True))
        beta: float = -1.0
        delta: float = 1e-4
        weighting: Literal["uniform", "samples"] = "uniform"
        eval_steps: int = 1
        eval_adapt_mode: Literal["steps", "epoch"] = "steps"

        def __post_init__(self):
            if self.alpha < 0:
                raise ValueError(f"alpha must be >= 0 (got {self.alpha})")
            if self.beta <= 0 and self.beta != -1:
                raise ValueError(f"beta must be > 0, or -1 for the run's lr (got {self.beta})")
            if self.delta <= 0:
                raise ValueError(f"delta must be > 0 (got {self.delta})")
            if self.eval_steps < 1:
                raise ValueError(f"eval_steps must be an integer >= 1 (got {self.eval_steps})")
            if self.eval_adapt_mode not in ("steps", "epoch"):
                raise ValueError(f"eval_adapt_mode must be steps or epoch (got {self.eval_adapt_mode})")

    @property
    def beta(self) -> float:
        return self.ctx.config.lr if self.hp.beta == -1 else self.hp.beta

    @staticmethod
    def gradient(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def hessian_vector(self, model: nn.Module, params: list[torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor, vec: list[torch.Tensor]) -> list[torch.Tensor]:
        """H(w; x, y) @ vec by central differences of the gradient; leaves the model at w."""
        delta = self.hp.delta
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, v in zip(params, vec):
                p.add_(v, alpha=delta)
        plus = self.gradient(model, params, x, y)
        with torch.no_grad():
            for p, w, v in zip(params, saved, vec):
                p.copy_(w).add_(v, alpha=-delta)
        minus = self.gradient(model, params, x, y)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        return [(gp - gm) / (2 * delta) for gp, gm in zip(plus, minus)]

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer, alpha = self.ctx.trainer, self.hp.alpha
        epochs = self.ctx.config.local_epochs
        params = list(model.parameters())
        opt = trainer.optimizer(params, lr=self.beta)
        streams = [trainer.batches(cid, epochs, round_, purpose="perfedavg-inner"),
                   trainer.batches(cid, epochs, round_)]
        if self.hp.variant == "hf":
            streams.append(trainer.batches(cid, epochs, round_, purpose="perfedavg-hessian"))
        model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        samples = 0
        for batches in zip(*streams):
            (x_in, y_in), (x_out, y_out) = batches[0], batches[1]
            saved = [p.detach().clone() for p in params]
            inner = self.gradient(model, params, x_in, y_in)
            with torch.no_grad():
                for p, g in zip(params, inner):
                    p.add_(g, alpha=-alpha)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_out), y_out)
            loss.backward()
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            if self.hp.variant == "hf":
                x_h, y_h = batches[2]
                hv = self.hessian_vector(model, params, x_h, y_h, [p.grad for p in params])
                with torch.no_grad():
                    for p, h in zip(params, hv):
                        p.grad.sub_(h, alpha=alpha)
            opt.step()
            loss_sum += loss.detach() * len(y_out)
            samples += len(y_out)
            trainer.count_grads(len(y_in))  # the inner step's gradient
            trainer.count_grads(len(y_out))  # the outer gradient at temp
            if self.hp.variant == "hf":
                trainer.count_grads(len(batches[2][1]), passes=2)  # the two finite-difference gradients
        return TrainStats(loss_sum=float(loss_sum), samples=samples)

    def aggregation_weight(self, cid: int, n_train: int) -> float:
        """Uniform over the sampled clients (the paper's mean), or by samples if asked."""
        return n_train if self.hp.weighting == "samples" else 1.0

    @classmethod
    def describe_eval_adaptation(cls, hp) -> str:
        if hp.eval_adapt_mode == "epoch":
            return cls.eval_adapt_epoch
        return super().describe_eval_adaptation(hp)

    def adaptation_batches(self, cid: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `steps` mini-batches of client `cid`'s fixed evaluation shuffle (further
        passes over the data when `steps` exceeds one epoch's batches)."""
        per_epoch = math.ceil(self.ctx.clients[cid].n_train / self.ctx.trainer.batch_size)
        stream = self.ctx.trainer.batches(cid, math.ceil(steps / per_epoch), 0, purpose=EVAL_STREAM)
        return list(itertools.islice(stream, steps))

    def adaptation_batch(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed training mini-batch of client `cid`'s first adaptation step."""
        return self.adaptation_batches(cid, 1)[0]

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A newcomer adapts the global model with the same step(s) every client takes at test time
        (the paper's point: the meta-model is an initialization any new client adapts)."""
        return self.eval_model(cid, global_state)

    def eval_state(self, cid: int, global_state: State) -> State:
        model = self.ctx.model
        set_state(model, global_state)
        if self.hp.eval_adapt_mode == "epoch":
            self.ctx.trainer.sgd(model, cid, 1, 0, purpose=EVAL_STREAM)  # counts its own passes
            return get_state(model)
        model.train()
        params = list(model.parameters())
        for x, y in self.adaptation_batches(cid, self.hp.eval_steps):
            grads = self.gradient(model, params, x, y)
            self.ctx.trainer.count_grads(len(y))
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=-self.hp.alpha)
        return get_state(model)

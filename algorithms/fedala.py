"""FedALA: Zhang, Hua, Wang, Song, Xue, Ma and Guan, "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023.

Before local training, client i aggregates its previous local model theta_i with the received
global model Theta element-wise (Adaptive Local Aggregation, ALA):

    start = theta_i + (Theta - theta_i) * W_i        (torch.lerp: exactly Theta where W = 1)

where W_i is 1 on the lower layers (they take the global values) and learned in [0, 1] on the top
`layers` layers. W_i (initialized to 1, kept per client) is trained by SGD on the loss of `start`,
W <- clip(W - eta * grad_start * (Theta - theta_i), 0, 1), one update per mini-batch of a random
`rand_percent`% sample of the client's training data (drawn afresh each round): until convergence
the first time ALA runs for a client, one epoch each later time. Then `local_epochs` of plain SGD
from `start` (the run's optimizer); the client keeps the trained model as theta_i and uploads it;
the server takes the sample-weighted mean. The whole model travels both ways; W_i never leaves
the client. At a client's first participation it has no local model and starts from the global
model (ALA is skipped, as in the authors' code, and its first ALA comes at its next
participation). Evaluation: the client's local model, as last trained (the global model for a
client that never trained).

ALA runs inside `local_train` (client work, timed as such): `adapt(cid, model, round_)` turns
the received global model into the start state. With W fixed at 1 (`eta=0`), every client starts
from the global model and training is exactly FedAvg's (tested).

Convergence of the first ALA: the mean loss of each epoch over the sample is recorded; W is
trained until more than `window` epochs were run and the (population) standard deviation of the
last `window` epoch losses is below `threshold`, or `max_epochs` epochs were run.

Hyperparameters:
- `layers` (1): p, the number of top layers (modules holding parameters, counted from the output)
  whose aggregation is learned; 1 is the head layer, the same as PFLlib's and FL-bench's default
  `layer_idx=2` (which counts parameter tensors: the head's weight and bias). 0 = every layer.
- `rand_percent` (80): s, the percentage of local training data ALA samples (PFLlib's and
  FL-bench's default).
- `eta` (1.0): learning rate of W (PFLlib's and FL-bench's default).
- `threshold` (0.01): convergence threshold on the std of epoch losses (as the issue asks; the
  authors' ALA code and FL-bench default to 0.1).
- `window` (10): number of recent epoch losses in that std (authors' code: num_pre_loss = 10).
- `max_epochs` (50): cap on the first ALA's epochs (the authors' loop has none).

Where published implementations differ: the authors' ALA module (PFLlib) samples a contiguous
random slice of the data, drops the last incomplete batch, records only the last batch's loss of
each epoch for the convergence test, and detects the first round by comparing one tensor of the
local and global models; PFLlib runs ALA on every client each round, sampled or not (so
unsampled clients also learn W and move their local models), and evaluates both right after ALA
and after local training. Here ALA runs only on clients that train, as in the paper's
description of a client's round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pflbench.algorithm import Algorithm
from pflbench.registry import register_algorithm
from pflbench.state import State, subset
from pflbench.training import TrainStats, stream_seed


@register_algorithm("fedala")
class FedALA(Algorithm):
    description = "Clients start each round from an element-wise learned mix of their local and the global model."
    citation = "Zhang et al., AAAI 2023"

    @dataclass
    class Hyperparams:
        layers: int = 1
        rand_percent: float = 80.0
        eta: float = 1.0
        threshold: float = 0.01
        window: int = 10
        max_epochs: int = 50

        def __post_init__(self):
            if self.layers < 0:
                raise ValueError(f"layers must be >= 0 (0 = all layers; got {self.layers})")
            if not 0.0 < self.rand_percent <= 100.0:
                raise ValueError(f"rand_percent must be in (0, 100] (got {self.rand_percent})")
            if self.eta < 0 or self.threshold < 0:
                raise ValueError("eta and threshold must be >= 0")
            if self.window < 1 or self.max_epochs < 1:
                raise ValueError("window and max_epochs must be >= 1")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        layers: list[list[str]] = []
        for key in self.all_keys:
            module = key.rsplit(".", 1)[0]
            if layers and layers[-1][0].rsplit(".", 1)[0] == module:
                layers[-1].append(key)
            else:
                layers.append([key])
        top = layers[-hp.layers:] if hp.layers else layers
        self.top_keys: tuple[str, ...] = tuple(k for layer in top for k in layer)
        self.local: dict[int, State] = {}
        self.weights: dict[int, State] = {}
        self.first_ala_epochs: dict[int, int] = {}

    def ala_sample(self, cid: int, round_: int) -> tuple[torch.Tensor, torch.Generator]:
        """Pool indices of this round's random `rand_percent`% of the client's training data."""
        idx = self.ctx.clients[cid].train
        gen = torch.Generator().manual_seed(stream_seed(self.ctx.trainer.seed, round_, cid, "fedala"))
        m = max(1, int(len(idx) * self.hp.rand_percent / 100.0))
        return idx[torch.randperm(len(idx), generator=gen)[:m].to(idx.device)], gen

    @torch.no_grad()
    def _merge(self, params: dict[str, torch.Tensor], local: State, global_: State, w: State) -> None:
        for k, p in params.items():
            p.copy_(torch.lerp(local[k], global_[k], w[k]))

    def adapt(self, cid: int, model: nn.Module, round_: int) -> int:
        """Turn `model`, holding the global model, into client `cid`'s ALA start state in place;
        return the number of W-learning epochs run."""
        local = self.local.get(cid)
        if local is None:
            return 0
        params = {n: p for n, p in model.named_parameters() if n in self.top_keys}
        global_top = {k: p.detach().clone() for k, p in params.items()}
        local_top = subset(local, self.top_keys)
        gap = {k: global_top[k] - local_top[k] for k in params}
        first = cid not in self.weights
        w = self.weights.get(cid) or {k: torch.ones_like(p) for k, p in global_top.items()}
        self._merge(params, local_top, global_top, w)
        sample, gen = self.ala_sample(cid, round_)
        data, batch_size = self.ctx.trainer.data, self.ctx.trainer.batch_size
        tensors = list(params.values())
        model.train()
        losses: list[float] = []
        while True:
            loss_sum = torch.zeros((), device=self.ctx.device)
            for take in sample[torch.randperm(len(sample), generator=gen).to(sample.device)].split(batch_size):
                y = data.y[take]
                loss = F.cross_entropy(model(data.x[take]), y)
                grads = torch.autograd.grad(loss, tensors)
                with torch.no_grad():
                    for k, g in zip(params, grads):
                        w[k].sub_(g * gap[k], alpha=self.hp.eta).clamp_(0.0, 1.0)
                self._merge(params, local_top, global_top, w)
                loss_sum += loss.detach() * len(y)
                self.ctx.trainer.count_grads(len(y))
            losses.append(float(loss_sum) / len(sample))
            if not first or len(losses) >= self.hp.max_epochs:
                break
            if len(losses) > self.hp.window and np.std(losses[-self.hp.window:]) < self.hp.threshold:
                break
        self.weights[cid] = w
        if first:
            self.first_ala_epochs[cid] = len(losses)
        return len(losses)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        self.adapt(cid, model, round_)
        return super().local_train(cid, model, round_)

    def upload(self, cid: int, trained: State) -> State:
        self.local[cid] = trained
        return trained

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.local.get(cid, global_state)

    def summary(self) -> dict[str, float]:
        epochs = list(self.first_ala_epochs.values())
        if not epochs:
            return {}
        return {"ala_first_epochs_mean": float(np.mean(epochs)), "ala_first_epochs_max": max(epochs)}

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
participation).

Evaluation (`eval=ala`, the default): every client is tested with ALA(current global model, its
local model), as in the authors' code (PFLlib), whose server runs ALA on every client when it
sends the global model and evaluates right after. Here that ALA is a read-only copy: W starts
from the client's stored W_i and is trained for one epoch on a `rand_percent`% sample drawn from
a stream of its own (seeded by (seed, round, client, "fedala-eval"), independent of training),
then the merged model is tested; the new W, the merged model and the sample are discarded, so
`self.local` and `self.weights` are unchanged and evaluating twice gives the same numbers. A
client that trained once but has no W yet (its first ALA comes at its next participation) is
treated as PFLlib treats a client whose ALA has not run yet: W starts at 1 and is trained as a
first ALA, until convergence (below). A client that never trained is tested with the global
model. The W-learning passes are counted as sample-gradients and, happening at evaluation, land
in `eval_grad_evals`. `eval=local` tests the local model as last trained instead (stale by
about 1 / join-ratio rounds; the global model for a client that never trained).

ALA runs inside `local_train` (client work, timed as such): `adapt(cid, model, round_)` turns
the received global model into the start state. Training and evaluation share one W-learning
routine, `ala`. With W fixed at 1 (`eta=0`), every client starts from, and is evaluated with, the
global model, and the run is exactly FedAvg's (tested).

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
- `threshold` (0.1): convergence threshold on the std of epoch losses (the default of the
  authors' ALA module in PFLlib, `threshold=0.1`, and of FL-bench's `--threshold`).
- `window` (10): number of recent epoch losses in that std (PFLlib and FL-bench:
  num_pre_loss = 10).
- `max_epochs` (50): cap on the first ALA's epochs (the reference loops have none; a cap keeps a
  run's cost bounded where the loss never settles).
- `eval` (`ala`): `ala` tests ALA(current global, local model) as PFLlib's server does;
  `local` tests the local model as last trained.

Where published implementations differ: the authors' ALA module (PFLlib) samples a contiguous
random slice of the data, keeps the last incomplete batch, records only the last batch's loss of
each epoch for the convergence test, and detects the first round by comparing one tensor of the
local and global models; PFLlib runs ALA on every client each round, sampled or not (so
unsampled clients also learn W and move their local models), and evaluates right after that
ALA, before the round's local training. Here ALA's training-time run happens only on clients that train, as
in the paper's description of a client's round, and the evaluation-time ALA changes nothing.

Search space (`pflbench tune`, beside the run's learning rate): eta in [0.1, 10], log scale, a
decade either side of the references' 1.0; rand_percent in [5, 100].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.models import layer_groups
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, set_state, subset
from pflbench.core.training import TrainStats, stream_seed


@register_algorithm("fedala")
class FedALA(Algorithm):
    description = "Clients start each round from an element-wise learned mix of their local and the global model."
    citation = "Zhang et al., AAAI 2023"
    client_state = "its last local model and its ALA weights (one per element of the ALA layers)"
    eval_adapt = ("ALA of the current global model and the client's local model: W learned for one epoch "
                  "from the client's stored W on {rand_percent}% of its training data (to convergence from "
                  "W = 1 where it has none), then merged; W is not kept")
    eval_adapt_local = "none (the client's local model as last trained)"

    @dataclass
    class Hyperparams:
        layers: int = 1
        rand_percent: float = tunable(80.0, Real(5.0, 100.0))
        eta: float = tunable(1.0, Real(0.1, 10.0, log=True))
        threshold: float = 0.1
        window: int = 10
        max_epochs: int = 50
        eval: Literal["ala", "local"] = "ala"

        def __post_init__(self):
            if self.layers < 0:
                raise ValueError(f"layers must be >= 0 (0 = all layers; got {self.layers})")
            if not 0.0 < self.rand_percent <= 100.0:
                raise ValueError(f"rand_percent must be in (0, 100] (got {self.rand_percent})")
            if self.eta < 0:
                raise ValueError(f"eta must be >= 0 (got {self.eta})")
            if self.threshold < 0:
                raise ValueError(f"threshold must be >= 0 (got {self.threshold})")
            if self.window < 1:
                raise ValueError(f"window must be >= 1 (got {self.window})")
            if self.max_epochs < 1:
                raise ValueError(f"max_epochs must be >= 1 (got {self.max_epochs})")
            if self.eval not in ("ala", "local"):
                raise ValueError(f"eval must be 'ala' or 'local' (got {self.eval!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        layers = layer_groups(self.all_keys)
        top = layers[-hp.layers:] if hp.layers else layers
        self.top_keys: tuple[str, ...] = tuple(k for layer in top for k in layer)
        self.local: dict[int, State] = {}
        self.weights: dict[int, State] = {}
        self.first_ala_epochs: dict[int, int] = {}
        self.round = 0  # the current round (set by begin_round): seeds the evaluation sample

    @classmethod
    def describe_eval_adaptation(cls, hp: Any) -> str:
        if getattr(hp, "eval", "ala") == "local":
            return cls.eval_adapt_local
        return super().describe_eval_adaptation(hp)

    def begin_round(self, round_: int, sampled: list[int]) -> None:
        self.round = round_

    def ala_sample(self, cid: int, round_: int, purpose: str = "fedala") -> tuple[torch.Tensor, torch.Generator]:
        """Pool indices of a random `rand_percent`% of the client's training data, and the
        generator (seeded by (seed, round, client, purpose)) that then shuffles it each epoch."""
        idx = self.ctx.clients[cid].train
        gen = torch.Generator().manual_seed(stream_seed(self.ctx.trainer.seed, round_, cid, purpose))
        m = max(1, int(len(idx) * self.hp.rand_percent / 100.0))
        return idx[torch.randperm(len(idx), generator=gen)[:m].to(idx.device)], gen

    @torch.no_grad()
    def _merge(self, params: dict[str, torch.Tensor], local: State, global_: State, w: State) -> None:
        for k, p in params.items():
            p.copy_(torch.lerp(local[k], global_[k], w[k]))

    def ala(self, model: nn.Module, local: State, w: State, sample: torch.Tensor,
            gen: torch.Generator, first: bool) -> int:
        """ALA's W-learning, shared by training and evaluation. `model` holds the global model on
        entry and the merged model on return (its lower layers stay global); `w` (top-layer
        tensors) is trained in place. One epoch over `sample`, or, if `first`, epochs until the
        convergence test or `max_epochs`. Counts its passes; returns the number of epochs."""
        params = {n: p for n, p in model.named_parameters() if n in self.top_keys}
        global_top = {k: p.detach().clone() for k, p in params.items()}
        local_top = subset(local, self.top_keys)
        gap = {k: global_top[k] - local_top[k] for k in params}
        self._merge(params, local_top, global_top, w)
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
        return len(losses)

    def initial_weights(self, cid: int) -> tuple[State, bool]:
        """A fresh copy of client `cid`'s W (all ones where it has none) and whether it had none."""
        stored = self.weights.get(cid)
        if stored is None:
            return {k: torch.ones_like(self.local[cid][k]) for k in self.top_keys}, True
        return {k: t.clone() for k, t in stored.items()}, False

    def adapt(self, cid: int, model: nn.Module, round_: int) -> int:
        """Turn `model`, holding the global model, into client `cid`'s ALA start state in place
        and keep the learned W; return the number of W-learning epochs run."""
        if cid not in self.local:
            return 0
        w, first = self.initial_weights(cid)
        epochs = self.ala(model, self.local[cid], w, *self.ala_sample(cid, round_), first)
        self.weights[cid] = w
        if first:
            self.first_ala_epochs[cid] = epochs
        return epochs

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        self.adapt(cid, model, round_)
        return super().local_train(cid, model, round_)

    def upload(self, cid: int, trained: State) -> State:
        self.local[cid] = trained
        return trained

    def eval_state(self, cid: int, global_state: State) -> State:
        """`eval=ala`: ALA(global, local) on a copy of W, nothing kept; `eval=local`: the local
        model. The global model for a client that never trained."""
        local = self.local.get(cid)
        if local is None:
            return global_state
        if self.hp.eval == "local":
            return local
        model = self.ctx.model
        set_state(model, global_state)
        w, first = self.initial_weights(cid)
        self.ala(model, local, w, *self.ala_sample(cid, self.round, "fedala-eval"), first)
        return get_state(model)

    def summary(self) -> dict[str, float]:
        epochs = list(self.first_ala_epochs.values())
        if not epochs:
            return {}
        return {"ala_first_epochs_mean": float(np.mean(epochs)), "ala_first_epochs_max": max(epochs)}

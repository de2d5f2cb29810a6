"""FedFomo: Zhang, Sapra, Fidler, Yeung and Alvarez, "Personalized Federated Learning with First
Order Model Optimization", ICLR 2021 (arXiv:2012.08565). References: the authors' code,
github.com/NVlabs/FedFomo (`client.py` `get_federating_clients`, `federation.py`
`compute_fomo_weights`, `federated/args.py`, the README's commands), PFLlib
(github.com/TsingZ0/PFLlib, `system/flcore/clients/clientfomo.py`, `servers/serverfomo.py`) and
FL-bench (github.com/KarhouTam/FL-bench, `src/client/fedfomo.py`, `src/server/fedfomo.py`).

No global model: every client i owns a model theta_i, and the server keeps a copy of each (the
last one the client uploaded; the references keep one per client on the server too), plus an
affinity matrix P (P[i, j]: how useful client j's models have been to client i so far).

Schedule per round, for each sampled client i:
1. server (`client_start`): chooses M other clients by epsilon-greedy on row i of P (below) and
   sends their models as they were at the start of the round (counted with
   `Context.count_traffic`: up to M models down, fewer while fewer candidates exist). Client i's own model stays on the client: nothing of
   it is downloaded (`download_keys` is empty).
2. client (`local_train`): scores each received model n on its validation samples,
       s_n = (L_i(theta_i) - L_i(theta_n)) / ||theta_n - theta_i||
   (L: mean cross-entropy on the validation samples; the norm over all parameters; s_n = 0 where
   the two models are equal), forms w_n = max(0, s_n) / sum_m max(0, s_m), and sets
       theta_i <- theta_i + sum_n w_n (theta_n - theta_i)
   over every state tensor (parameters and normalization statistics). Where no s_n is positive,
   theta_i is left exactly as it was. Then `local_epochs` of SGD (the run's optimizer, fresh) on
   its training samples outside the validation carve-out.
3. up: theta_i and the M scores s_n (M float32 numbers, part of the upload's payload, so the
   engine counts them). The server adds them to row i of P (`affinity=raw`) and stores theta_i
   as client i's model at the end of the round: uploads are held until then, so every client of
   a round receives the models of the round's start whatever the order in which clients train.

Epsilon-greedy (the authors' `get_federating_clients`): the candidates are the other clients
whose model the server holds (those that trained at least once; a never-trained model is the
shared initialization, which carries nothing), ranked by P[i, j] with ties broken at random. For
each of the M slots, with probability eps_t a uniformly random remaining candidate is taken, else
the best-ranked remaining one; eps_t = max(0, eps - eps_decay * (round - 1)). M is capped by the
number of candidates, so the first round downloads nothing and every client trains alone (as in
PFLlib, whose first round also sends no model). Draws come from a generator seeded by (seed,
round, client, "fedfomo-select").

Validation data: each client holds out a random `val_fraction` of its training samples
(int(val_fraction * n) samples, as PFLlib and FL-bench count them) for the scores, and trains on
the rest, as the paper, PFLlib and FL-bench do. The carve-out is drawn once per client, from the
stream (seed, client, "fedfomo-val"), and kept for the run, as PFLlib's (its last 20%) is;
FL-bench draws a new one each time the client is sampled. This is the algorithm's own split: the engine's `--val-ratio` split (for model
selection and tuning) is never read. `val_fraction = 0` scores on the whole training set and
trains on all of it (no carve-out); a client whose carve-out is empty downloads nothing.

Evaluation: the client's own model as last trained (what PFLlib tests), the initialization for a
client that never trained. Nothing is adapted at test time.

Memory per client: its model (one model; server side in this simulation, it is also the
client's) and its row of P (N float64 numbers); plus, within a round, the uploads of the round's
sampled clients until the round ends, and one scratch model. fedavgcnn on FMNIST (582,026
parameters): 2,328,104 bytes per model, 8N bytes per row of P.

Communication per sampled client and round: M' models down (M' = min(M, candidates)), one model
and 4 M' bytes up. Compute: `local_epochs` passes over the training samples outside the
carve-out (counted); the M' + 1 validation evaluations are forward-only (not counted).

Hyperparameters:
    M = 5            models downloaded per round: PFLlib's `-M` and FL-bench's `--M` default, and
                     the smaller of the authors' two README settings ("5 models", run as
                     `--num_update_clients 4` plus the client's own model; here the own model is
                     always at hand and not counted among the M; "10 models" is M = 9 or 10).
    eps = 0.3        initial exploration probability, and
    eps_decay = 0.05 its decrease per round: the authors' README commands
                     (`--client_weight_epsilon 0.3 --client_weight_epsilon_decay 0.05`). PFLlib and
                     FL-bench take the top M of P without exploration: `eps=0`.
    val_fraction = 0.2  PFLlib's `val_ratio = 0.2`, FL-bench's `--valset_ratio 0.2`, the authors'
                     `--train_split 0.8`.
    affinity = raw   what is added to P[i, n]: the raw score s_n, negative ones included, as
                     PFLlib (`P[i] += weight_vector`) and FL-bench (`P[i][j] += w`) do, so that a
                     harmful model sinks below an untried one; `weights` adds w_n (clipped and
                     normalized: the weights the client applied, recomputed by the server from the
                     uploaded float32 scores).

Where the references differ and this file does not follow them all: PFLlib and FL-bench add 1e-5
to the norm (here an exact zero distance gives s_n = 0 and any other is used as is), and PFLlib
compares against the model as it was after the previous round's combination, before its local
training (`old_model`), where the paper and FL-bench use the current model, as here. PFLlib's
candidates include the client itself (its P starts as the identity) and any client, trained or
not; FL-bench's are the previous round's clients only. The authors' code compares against a
"first model" baseline in its README commands and normalizes the P increments by the sum of their
absolute values; here the paper's current-model formula is used.

Search space (`pflbench tune`, beside the run's learning rate): M in {1..10}, spanning the authors'
two settings ("5 models" and "10 models").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Integer, tunable
from pflbench.core.state import State, get_state, nbytes, set_state
from pflbench.core.training import ClientData, TrainStats, stream_seed

SCORES = "fedfomo.scores"  # the payload entry carrying the client's scores s_n (not a model tensor)


def fomo_weights(scores: torch.Tensor) -> torch.Tensor:
    """w_n = max(0, s_n) / sum_m max(0, s_m); all zeros where no score is positive."""
    clipped = scores.clamp(min=0)
    total = clipped.sum()
    return clipped / total if total > 0 else clipped


def combine(own: State, others: list[State], weights: torch.Tensor) -> State:
    """theta_i + sum_n w_n (theta_n - theta_i) for every tensor; `own` itself (the same tensors)
    where every weight is zero."""
    if not bool((weights > 0).any()):
        return own
    out = {}
    for key, value in own.items():
        acc = value.clone()
        for w, other in zip(weights.tolist(), others):
            if w > 0:
                acc.add_(other[key] - value, alpha=w)
        out[key] = acc
    return out


@register_algorithm("fedfomo")
class FedFomo(Algorithm):
    description = ("Each client moves its model towards the downloaded models of M other clients that lower "
                   "its validation loss, weighted by first-order gain, then trains it.")
    citation = "Zhang et al., ICLR 2021"
    personal = "all"
    client_state = ("its own model (the server keeps a copy), its row of the affinity matrix P (one number per "
                    "client) and a fixed share {val_fraction} of its training samples held out to weigh the others")
    eval_adapt = "none"

    @dataclass
    class Hyperparams:
        M: int = tunable(5, Integer(1, 10))
        eps: float = 0.3
        eps_decay: float = 0.05
        val_fraction: float = 0.2
        affinity: Literal["raw", "weights"] = "raw"

        def __post_init__(self):
            if self.M < 0:
                raise ValueError(f"M must be >= 0 (got {self.M})")
            if not 0.0 <= self.eps <= 1.0:
                raise ValueError(f"eps must be in [0, 1] (got {self.eps})")
            if not self.eps_decay >= 0.0:
                raise ValueError(f"eps_decay must be >= 0 (got {self.eps_decay})")
            if not 0.0 <= self.val_fraction < 1.0:
                raise ValueError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
            if self.affinity not in ("raw", "weights"):
                raise ValueError(f"affinity must be 'raw' or 'weights' (got {self.affinity!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        n = len(ctx.clients)
        self.model_bytes = nbytes(get_state(ctx.model))
        self.models: dict[int, State] = {}  # client -> its last uploaded model (round-start view)
        self.P = np.zeros((n, n))
        self.sent: dict[int, list[int]] = {}  # client -> the clients whose models it got this round
        self.scores: dict[int, torch.Tensor] = {}  # client -> its scores s_n, until its upload
        self.round = 0
        self.scratch = copy.deepcopy(ctx.model)
        self.downloaded = 0
        self.used = 0
        # the client's own held-out validation samples and a trainer view training on the rest
        self.fit_trainer = ctx.trainer
        self.has_val = [True] * n
        if hp.val_fraction > 0:
            clients = []
            for cid, c in enumerate(ctx.clients):
                gen = torch.Generator().manual_seed(stream_seed(ctx.config.seed, cid, "fedfomo-val"))
                n_val = int(hp.val_fraction * c.n_train)
                held = torch.zeros(c.n_train, dtype=torch.bool)
                held[torch.randperm(c.n_train, generator=gen)[:n_val]] = True
                held = held.to(c.train.device)
                clients.append(ClientData(c.train[~held], c.test, c.train[held]))
                self.has_val[cid] = n_val > 0
            self.fit_trainer = copy.copy(ctx.trainer)
            self.fit_trainer.clients = clients

    # -- server: which models a client receives ---------------------------------------------------
    def begin_round(self, round_: int, sampled: list[int]) -> None:
        self.round = round_

    def epsilon(self, round_: int) -> float:
        return max(0.0, self.hp.eps - self.hp.eps_decay * (round_ - 1))

    def select(self, cid: int, round_: int) -> list[int]:
        """Epsilon-greedy choice of up to M other clients whose models the server holds."""
        candidates = [j for j in sorted(self.models) if j != cid]
        m = min(self.hp.M, len(candidates))
        if m == 0 or not self.has_val[cid]:
            return []
        rng = np.random.default_rng(stream_seed(self.ctx.config.seed, round_, cid, "fedfomo-select"))
        ties = rng.random(len(candidates))
        affinity = self.P[cid, candidates]
        ranked = [candidates[k] for k in np.lexsort((-ties, -affinity))]  # best first, ties at random
        eps = self.epsilon(round_)
        chosen = []
        for _ in range(m):
            k = int(rng.integers(len(ranked))) if rng.random() < eps else 0
            chosen.append(ranked.pop(k))
        return chosen

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return ()  # the client's own model never travels down; the others' are counted below

    def client_start(self, cid: int, global_state: State) -> State:
        self.sent[cid] = self.select(cid, self.round)
        self.ctx.count_traffic(down=len(self.sent[cid]) * self.model_bytes)
        return self.models.get(cid, global_state)

    # -- client: weigh the received models, move towards them, train --------------------------------
    def val_loss(self, model: nn.Module, cid: int) -> float:
        split = "val" if self.hp.val_fraction > 0 else "train"
        res = self.fit_trainer.evaluate(model, cid, split=split)
        return res.loss_sum / res.n

    def distance(self, a: State, b: State) -> float:
        return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in self.param_keys))

    def score(self, cid: int, model: nn.Module, own: State, neighbours: list[int]) -> torch.Tensor:
        """s_n for every received model (float64 on the CPU)."""
        base = self.val_loss(model, cid)
        scores = []
        for j in neighbours:
            other = self.models[j]
            set_state(self.scratch, other)
            dist = self.distance(other, own)
            scores.append((base - self.val_loss(self.scratch, cid)) / dist if dist > 0 else 0.0)
        return torch.tensor(scores, dtype=torch.float64)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        neighbours = self.sent.get(cid, [])
        scores = torch.zeros(0, dtype=torch.float64)
        if neighbours:
            own = get_state(model)
            scores = self.score(cid, model, own, neighbours)
            weights = fomo_weights(scores)
            self.downloaded += len(neighbours)
            self.used += int((weights > 0).sum())
            start = combine(own, [self.models[j] for j in neighbours], weights)
            if start is not own:
                set_state(model, start)
        self.scores[cid] = scores
        trainer = self.fit_trainer
        before = trainer.grad_evals
        stats = trainer.sgd(model, cid, self.ctx.config.local_epochs, round_)
        if trainer is not self.ctx.trainer:
            self.ctx.trainer.count_grads(trainer.grad_evals - before)
        return stats

    def upload(self, cid: int, trained: State) -> State:
        scores = self.scores.pop(cid).to(device=self.ctx.device, dtype=torch.float32)
        return {**trained, SCORES: scores}

    # -- server: store the models at the round's end, update P ----------------------------------------
    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        payload = dict(upload.payload)
        scores = payload.pop(SCORES).double().cpu()
        acc.extra.setdefault("models", {})[upload.cid] = payload
        sent = self.sent.pop(upload.cid, [])
        if sent:
            increment = scores if self.hp.affinity == "raw" else fomo_weights(scores)
            self.P[upload.cid, sent] += increment.numpy()

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        self.models.update(acc.extra.get("models", {}))
        return global_state  # the initialization, for clients that never trained

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.models.get(cid, global_state)

    def summary(self) -> dict[str, float]:
        if not self.downloaded:
            return {}
        return {"fomo_models_downloaded": self.downloaded,
                "fomo_positive_weight_share": self.used / self.downloaded}

"""FedAS: Yang, Huang and Ye, "FedAS: Bridging Inconsistency in Personalized Federated Learning",
CVPR 2024 (authors' code: github.com/xiyuanyang45/FedAS, a variant of PFLlib; PFLlib carries it as
`system/flcore/clients/clientas.py` and `servers/serveras.py`; FL-bench as `src/client/fedas.py`
and `src/server/fedas.py`).

Two fixes of FedPer-style decoupling (body shared, head personal), one per inconsistency the paper
names:

- Parameter alignment (intra-client): the new global body and the client's old head were never
  trained together. Before local training, the client fine-tunes the received global body so that
  its features of the client's training samples match the client's class prototypes, the mean
  feature of each class under the client's previous body ("the shared parts learn from the
  previous model"). Only the body moves; the head is the client's own.
- Client synchronization (inter-client): the server averages the bodies weighted by each
  uploader's Fisher information, its trace computed on the client's training data with its
  freshly trained model, instead of by its number of samples, so that under-trained clients
  (stragglers) weigh less.

Schedule per round, for a sampled client i:
1. Down: the global body (FedPer's download). The client's start is the global body under its
   own head (the initial head before its first participation).
2. Alignment (`align_epochs` epochs of plain SGD, learning rate `align_lr`, on the body only,
   batches of the run's size from the "fedas-align" stream): targets are the client's class
   prototypes P_c (the mean body feature of its training samples of class c under its previous
   body); the loss on a batch is, with `align_loss = sample` (authors' code and PFLlib),
   sum over the batch's classes c of mean over its samples x of class c and the D feature
   coordinates of (f(x) - P_c)^2 (torch's MSELoss per class, summed over classes); with
   `align_loss = mean` (FL-bench) sum over classes c of mean over D of (mean of f(x) over the
   batch's samples of class c - P_c)^2. Every class of a batch has a prototype (the prototypes are
   computed on the same training set).
3. Local training: `local_epochs` of the run's SGD on the whole model (body and head), plain
   cross-entropy, batches from "train" (FedPer's schedule).
4. The client's new prototypes (one forward pass of the trained body over its training data, not
   a gradient) are kept for its next alignment; with `weights = fisher`, the trace of its Fisher
   information on the trained model (below).
5. Up: the trained body, and with `weights = fisher` its Fisher trace (one float32).
6. Server: the next global body is sum_i w_i * body_i over the round's uploads, with
   w_i = T_i / sum_j T_j (`weights = fisher`; T_i the uploaded trace) or w_i = n_i / sum_j n_j
   (`weights = samples`, the authors' `--wo_global` ablation, which is FedPer's aggregation). The
   traces arrive with the uploads, so the streamed mean sums T_i * body_i and divides by the sum of
   the traces at the end (`RunningMean` without an announced total); `last_weights` holds the
   normalized weights of the last round. A round in which every trace is 0 (every gradient of
   every uploader exactly zero) leaves the body unchanged.

Fisher trace. `fisher = batch` (default; authors' code, PFLlib and FL-bench): the sum over the
client's training mini-batches (run's batch size, in the client's sample order, unshuffled as the
authors' loader; the last, partial batch included) of ||grad of the batch's mean negative
log-likelihood||^2 over every parameter (body and head), with the model in eval mode. The sum
grows with the number of batches, as in the references. `fisher = sample`: the empirical Fisher's
trace, mean over the training samples of ||grad log p(y|x)||^2, from per-sample gradients
(`pflbench.core.fisher`, shared with FedDPA). Either way one forward and backward pass per
training sample, counted as one sample-gradient per sample.

First participation (`first`): the client has no previous body. `init` (default): its previous
model is the initial model (authors' code and PFLlib, where every client object starts as a copy
of the initial model), so its prototypes come from the initial body; `global`: from the received
global body (FL-bench, whose `prev_model` is the received model when none was kept).

Evaluation (`eval`, read-only, no training): `local` (default; authors' code, PFLlib and
FL-bench, which test each client's own model as it left its last local training): the client's
last trained body and head; a client never sampled is tested with the initial model (`first =
init`) or the global body under its (initial) head (`first = global`). `global`: the current
global body under the client's head (FedPer's evaluation).

Exact boundary: with `align_epochs = 0` (the authors' `--wo_local`), `weights = samples` and
`eval = global`, FedAS is FedPer, bit for bit (same batches, same bytes).

Memory per client: its head (personal), its class prototypes (classes x features floats, when
`align_epochs` > 0) and, with `eval = local`, its trained body; plus one copy of the initial body.
For fedavgcnn on FMNIST (float32): head 20,520 bytes, prototypes 20,480, body 2,307,584, so
2,348,584 bytes per client with the defaults, 41,000 with `eval = global`.

Communication per sampled client and round: down the global body; up the body and, with
`weights = fisher`, 4 bytes (the trace), both through the engine's download and upload. Nothing
else travels: prototypes and Fisher are computed and kept on the client.

Compute: per participation `align_epochs` + `local_epochs` + 1 (Fisher, with `weights = fisher`)
sample-gradients per training sample; prototypes are forward passes (not counted). The training
loss a round reports is the local training's cross-entropy (the alignment loss is not added in).
The run's summary carries `fedas_last_max_weight`, the largest normalized Fisher weight of the last
round (1 / clients per round would be uniform).

Defaults and where they come from:
    align_epochs = 1       authors' code and PFLlib (`range(1)`), FL-bench `alignment_epoch`.
    align_lr = 0.01        authors' code and PFLlib (fixed SGD lr 0.01), FL-bench `alignment_lr`;
                           plain SGD (no momentum or weight decay) as all three.
    align_loss = sample    authors' code and PFLlib; `mean` is FL-bench's.
    weights = fisher       paper, authors' code, PFLlib, FL-bench; `samples` is `--wo_global`.
    fisher = batch         authors' code, PFLlib and FL-bench; `sample` the textbook estimate.
    first = init           authors' code and PFLlib; `global` is FL-bench.
    eval = local           authors' code, PFLlib and FL-bench; `global` is FedPer's.
Differences from the references, deliberate: the alignment uses the run's batch size (FL-bench
does; the authors' code hard-codes batches of 16, the batch size of their own runs,
system/examples.sh `-lbs 16`); the Fisher batches keep the last partial batch (the references'
loaders drop it); the references upload (and average) the head too, although no client ever reads
the averaged head, so here only the body travels; PFLlib also computes the Fisher of clients not
sampled, which nothing uses, so it is skipped.

Search space (`pflbench tune`, beside the run's learning rate): align_lr in [1e-3, 0.1], log scale,
a decade either side of the references' 0.01 (the paper gives no grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.fisher import squared_sample_grads
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import RunningMean, State, get_state, set_state, subset
from pflbench.core.training import EVAL_BATCH, TrainStats

FISHER = "fedas:fisher_trace"  # upload key of the Fisher trace (not a model tensor)
ALIGN_STREAM = "fedas-align"


def alignment_loss(features: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor, kind: str) -> torch.Tensor:
    """FedAS's alignment loss of a batch's `features` (B x D) with labels `y` towards the class
    `prototypes` (C x D): `sample`: sum over the batch's classes of the mean squared error of
    that class's features to its prototype; `mean`: sum over the batch's classes of the mean
    squared error of that class's mean feature to its prototype."""
    counts = torch.bincount(y, minlength=prototypes.shape[0])
    features = features.float()
    if kind == "sample":
        per_sample = (features - prototypes[y]).square().mean(1)
        return (per_sample / counts[y]).sum()
    sums = torch.zeros_like(prototypes).index_add_(0, y, features)
    present = counts > 0
    means = sums[present] / counts[present, None]
    return (means - prototypes[present]).square().mean(1).sum()


@register_algorithm("fedas")
class FedAS(Algorithm):
    description = ("Head personal; the new global body is first aligned to the client's old class "
                   "prototypes; bodies averaged by the trace of each client's Fisher information.")
    citation = "Yang, Huang and Ye, CVPR 2024"
    personal = "head"
    # both depend on `eval` and `align_epochs`: see describe_eval_adaptation / describe_client_state
    eval_adapt = "none (the client's own model as it left its last local training; the initial model before)"
    client_state = "its head, its class prototypes (classes x features) and its last trained body"

    @dataclass
    class Hyperparams:
        align_epochs: int = 1
        align_lr: float = tunable(0.01, Real(1e-3, 0.1, log=True))
        align_loss: Literal["sample", "mean"] = "sample"
        weights: Literal["fisher", "samples"] = "fisher"
        fisher: Literal["batch", "sample"] = "batch"
        first: Literal["init", "global"] = "init"
        eval: Literal["local", "global"] = "local"

        def __post_init__(self):
            if self.align_epochs < 0:
                raise ValueError(f"align_epochs must be >= 0 (got {self.align_epochs})")
            if not self.align_lr > 0:
                raise ValueError(f"align_lr must be > 0 (got {self.align_lr})")
            choices = {"align_loss": ("sample", "mean"), "weights": ("fisher", "samples"),
                       "fisher": ("batch", "sample"), "first": ("init", "global"), "eval": ("local", "global")}
            for name, allowed in choices.items():
                if getattr(self, name) not in allowed:
                    raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)})")

    @classmethod
    def describe_eval_adaptation(cls, hp: Any) -> str:
        if getattr(hp, "eval", "local") == "global":
            return "none (the current global body under the client's head)"
        return "none (the client's own model as it left its last local training; the initial model before)"

    @classmethod
    def describe_client_state(cls, hp: Any) -> str:
        parts = ["its head"]
        if getattr(hp, "align_epochs", 1) > 0:
            parts.append("its class prototypes (classes x features)")
        if getattr(hp, "eval", "local") == "local":
            parts.append("its last trained body")
        return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.initial_body = get_state(ctx.model, self.body_keys)
        self.prototypes: dict[int, torch.Tensor] = {}
        self.bodies: dict[int, State] = {}
        self.traces: dict[int, float] = {}  # the client's last Fisher trace (before upload)
        self.last_weights: dict[int, float] = {}

    # -- client side ---------------------------------------------------------------------------
    @torch.no_grad()
    def class_prototypes(self, model: nn.Module, cid: int) -> torch.Tensor:
        """Mean body feature per class over client `cid`'s training samples (C x D, float32; rows
        of classes the client lacks are zero and never used)."""
        model.eval()
        data, idx = self.ctx.trainer.data, self.ctx.clients[cid].train
        sums, counts = None, torch.zeros(self.ctx.num_classes, device=idx.device)
        for start in range(0, len(idx), EVAL_BATCH):
            take = idx[start:start + EVAL_BATCH]
            feats = model.body(data.x[take]).double()
            if sums is None:
                sums = torch.zeros(self.ctx.num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
            y = data.y[take]
            sums.index_add_(0, y, feats)
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
        return (sums / counts.clamp(min=1).double()[:, None]).float()

    def first_prototypes(self, model: nn.Module, cid: int) -> torch.Tensor:
        """Prototypes of a client without a previous body: the initial body's (`first = init`) or
        the received global body's (`first = global`)."""
        if self.hp.first == "global":
            return self.class_prototypes(model, cid)
        received = get_state(model, self.body_keys)
        set_state(model, self.initial_body)
        prototypes = self.class_prototypes(model, cid)
        set_state(model, received)
        return prototypes

    def align(self, cid: int, model: nn.Module, round_: int, prototypes: torch.Tensor) -> TrainStats:
        kind = self.hp.align_loss

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return alignment_loss(m.body(x), y, prototypes, kind)

        opt = torch.optim.SGD(self.params_of(model, self.body_keys), lr=self.hp.align_lr)
        return self.ctx.trainer.sgd(model, cid, self.hp.align_epochs, round_, optimizer=opt,
                                    loss_fn=loss_fn, purpose=ALIGN_STREAM)

    def fisher_trace(self, cid: int, model: nn.Module) -> float:
        """Trace of client `cid`'s Fisher information on `model` (see the module docstring)."""
        model.eval()
        data, idx = self.ctx.trainer.data, self.ctx.clients[cid].train
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        total = torch.zeros((), dtype=torch.float64, device=idx.device)
        if self.hp.fisher == "batch":
            params = list(named.values())
            for take in idx.split(self.ctx.config.batch_size):
                loss = F.cross_entropy(model(data.x[take]), data.y[take])
                grads = torch.autograd.grad(loss, params)
                total += sum(g.double().square().sum() for g in grads)
        else:
            squares = squared_sample_grads(model, data.x, data.y, idx)
            total += sum(t.double().sum() for n, t in squares.items() if n in named)
            total /= max(1, len(idx))
        self.ctx.trainer.count_grads(len(idx))  # one forward+backward per training sample
        return float(total)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        if self.hp.align_epochs > 0:
            prototypes = self.prototypes.get(cid)
            if prototypes is None:
                prototypes = self.first_prototypes(model, cid)
            self.align(cid, model, round_, prototypes)  # its loss is not the training loss reported
        stats = self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_)
        if self.hp.align_epochs > 0:
            self.prototypes[cid] = self.class_prototypes(model, cid)
        if self.hp.weights == "fisher":
            self.traces[cid] = self.fisher_trace(cid, model)
        return stats

    def upload(self, cid: int, trained: State) -> State:
        payload = super().upload(cid, trained)  # keeps the head, sends the body
        if self.hp.eval == "local":
            self.bodies[cid] = subset(trained, self.body_keys)
        if self.hp.weights == "fisher":
            payload[FISHER] = torch.tensor(self.traces.pop(cid), dtype=torch.float32, device=self.ctx.device)
        return payload

    # -- server side: Fisher-weighted mean -------------------------------------------------------
    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        if self.hp.weights == "samples":
            return super().begin_aggregation(global_state, expected)
        # the weights arrive with the uploads: sum T_i * body_i, divide by sum T_i at the end
        return Accumulator(RunningMean(0.0), dict(expected), {"traces": {}})

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        if self.hp.weights == "samples":
            return super().accumulate(acc, upload)
        body = dict(upload.payload)
        trace = float(body.pop(FISHER))
        acc.extra["traces"][upload.cid] = trace
        acc.mean.add(body, trace)

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        traces = acc.extra.get("traces")
        if traces is not None:
            total = sum(traces.values())
            self.last_weights = {cid: t / total for cid, t in traces.items()} if total > 0 else {}
        return super().finish_aggregation(acc, global_state)

    # -- evaluation (read-only) ------------------------------------------------------------------
    def eval_state(self, cid: int, global_state: State) -> State:
        head = self.kept.get(cid, {})
        if self.hp.eval == "global":
            return {**global_state, **head}
        if cid in self.bodies:
            return {**global_state, **self.bodies[cid], **head}
        if self.hp.first == "init":
            return {**global_state, **self.initial_body, **head}
        return {**global_state, **head}

    def summary(self) -> dict[str, float]:
        if not self.last_weights:
            return {}
        return {"fedas_last_max_weight": max(self.last_weights.values())}

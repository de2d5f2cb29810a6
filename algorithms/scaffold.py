"""SCAFFOLD: Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020 (arXiv:1910.06378).

A global method, here as a reference point for the personalized ones: every client is tested with
the global model x (`eval_adapt` is "none"; the engine's `--finetune-epochs K` adds fine-tuned
`_ft` figures to it as to any algorithm).

State: the server keeps the model x and a server control variate c; every client i keeps its own
control variate c_i. All control variates have the shapes of the model's parameters and start at
zero (the paper's initialization; FL-bench and PFLlib do the same). A model's normalization
statistics (BatchNorm running mean and variance, where it has them) have no gradient and so no
control variate: they travel with the model and are averaged as the parameters' y are.

Schedule per round t, for each sampled client i (S the sampled set, N the run's clients):

1. down: x and c (the engine counts x; c is added with `Context.count_traffic`).
2. local: from y = x, `local_epochs` of the run's SGD (fresh optimizer, "train" batch stream, as
   FedAvg) where every step uses the corrected gradient g(y) - c_i + c, i.e. without momentum and
   weight decay y <- y - lr (g(y) - c_i + c). The correction is added to the mini-batch gradient
   before the optimizer's step, so with the run's momentum or weight decay it enters the momentum
   buffer and sits beside the decay exactly as a gradient does. This is FL-bench's choice
   (src/client/scaffold.py adds c - c_i to `param.grad` and steps its configured optimizer);
   PFLlib (system/flcore/optimizers/fedoptimizer.py, SCAFFOLDOptimizer) and the FedDyn authors'
   SCAFFOLD baseline (github.com/alpemreacar/FedDyn, utils_general.py, as a linear loss term) also
   add it to the gradient, with optimizers that have no momentum; that baseline also clips the
   corrected gradient to norm 10, as it does for every method it runs, which neither PFLlib nor
   FL-bench does for SCAFFOLD, nor we. The reported training loss is the cross-entropy alone (the
   correction is not a loss).
3. control variate, the paper's option II: c_i+ = c_i - c + (x - y) / (K lr), with K the number of
   local steps this client took (epochs x batches, counted) and lr the run's learning rate, as
   PFLlib's `update_yc` (K = batches x epochs). FL-bench's client takes `local_epoch` single
   mini-batch steps and uses K = local_epoch, and the FedDyn authors' baseline a fixed step count:
   the same formula with K the steps taken. Under the run's momentum beta the displacement x - y
   is about 1 / (1 - beta) times K lr times the mean corrected gradient, so the c_i are scaled by
   about that factor; the paper and PFLlib have no momentum and FL-bench leaves the formula as it
   is, as we do by default (`cv_lr="lr"`; the engine's default momentum 0 is the paper's
   setting). `cv_lr="effective"` divides by K lr / (1 - beta) instead, so that c_i estimates the
   mean corrected gradient under momentum too; it is this benchmark's option, in no reference. On
   the committed CIFAR-10 grid (Dir(0.1), lr 0.01, momentum 0.7, seed 42) the default's loss
   turned NaN in round 16, on the CPU and on a GPU alike, while `effective` trained to 37.49%
   (FedAvg 33.67% on that seed).
4. up: Delta y = y - x and Delta c = c_i+ - c_i. Delta y travels as y itself (the same bytes; the
   server, which holds x, forms y - x), which makes global_lr = 1 bit-identical to a mean of the
   models. Both are in the upload payload, so the engine counts them.
5. server: x <- x + global_lr * mean_S(Delta y), c <- c + (|S| / N) * mean_S(Delta c).
   The mean over S is plain (every sampled client weighs 1), as in the paper's Algorithm 1, PFLlib
   (serverscaffold.py divides by the number of joining clients), FL-bench (server/scaffold.py,
   weights 1/|S|) and the FedDyn authors' baseline; `weighting=samples` weights Delta y by the
   clients' training samples instead, as FedAvg does in this benchmark. Delta c is always summed
   with weight 1/N, so c stays the mean of all N client control variates (the paper's invariant).
   With global_lr = 1 and `weighting=samples`, round 1 (every control variate zero) is exactly a
   FedAvg round.

Aggregation streams: Delta y goes into the engine's running mean, Delta c into one running sum kept
beside it; nothing else of the round is held.

Memory: one control variate (one model-sized set of tensors) per client that has trained, plus c
on the server (for fedavgcnn on Fashion-MNIST, 582,026 parameters: 2.33 MB per client).
Communication per sampled client and round: two models down (x, c) and two up (y, Delta c),
exactly twice FedAvg's.

Hyperparameters:
    global_lr = 1.0           the server step size eta_g. The paper's experiments fix eta_g = 1 and
                              tune only the local step size (which `pflbench tune` tunes for every
                              algorithm); 1.0 is also PFLlib's `server_learning_rate` and FL-bench's
                              `global_lr` default. Not searched, for that reason.
    weighting = "uniform"     the mean over the sampled clients' Delta y: "uniform" (paper, PFLlib,
                              FL-bench) or "samples" (FedAvg's sample-weighted mean).
    cv_lr = "lr"              the step size in option II's (x - y) / (K lr): "lr", the run's
                              learning rate (paper, PFLlib, FL-bench), or "effective", lr / (1 -
                              momentum), the step momentum makes in the long run (see 3. above;
                              the same as "lr" without momentum).

Not implemented: the paper's option I (c_i+ = the full local gradient at x, one more pass over the
client's data), and the FedDyn authors' per-client rescaling of Delta c by relative dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import added_later, register_algorithm
from pflbench.core.state import State, nbytes
from pflbench.core.training import TrainStats

DELTA_C = "scaffold.delta_c:"  # prefix of the Delta c tensors in the upload payload
WEIGHTINGS = ("uniform", "samples")
CV_LRS = ("lr", "effective")


class CorrectedSGD(torch.optim.SGD):
    """The run's SGD whose every step first adds a fixed `shift` (one tensor per parameter, in the
    order of `params`) to the gradient: the correction then passes through momentum and weight
    decay as the gradient does. Counts its steps."""

    def __init__(self, params: list[torch.Tensor], shift: list[torch.Tensor], **settings):
        super().__init__(params, **settings)
        self.shift = shift
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        for p, s in zip(self.param_groups[0]["params"], self.shift):
            if p.grad is not None:
                p.grad.add_(s)
        self.steps += 1
        return super().step(closure)


@register_algorithm("scaffold")
class Scaffold(Algorithm):
    description = "Local SGD corrected by control variates (g - c_i + c) against client drift; global model."
    citation = "Karimireddy et al., ICML 2020"
    eval_adapt = "none"
    client_state = "a control variate c_i (one tensor per parameter; the server keeps c)"

    @dataclass
    class Hyperparams:
        global_lr: float = 1.0
        weighting: Literal["uniform", "samples"] = "uniform"
        cv_lr: Literal["lr", "effective"] = added_later("lr")

        def __post_init__(self):
            if not (self.global_lr > 0 and self.global_lr < float("inf")):
                raise ValueError(f"global_lr must be a finite number > 0 (got {self.global_lr})")
            if self.weighting not in WEIGHTINGS:
                raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)} (got {self.weighting!r})")
            if self.cv_lr not in CV_LRS:
                raise ValueError(f"cv_lr must be one of {', '.join(CV_LRS)} (got {self.cv_lr!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        # control variates cover the trained parameters (a normalization statistic, which has no
        # gradient, is averaged as FedAvg does)
        params = dict(ctx.model.named_parameters())
        self.c: State = {k: torch.zeros_like(params[k]) for k in self.param_keys}
        self.c_local: dict[int, State] = {}  # absent: zero (the paper's start)
        self.received: State = {}  # x, as the client being trained received it
        self.steps = 0  # K of the client being trained

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def control(self, cid: int) -> State:
        """Client `cid`'s control variate c_i (zero before its first round)."""
        c_i = self.c_local.get(cid)
        return c_i if c_i is not None else {k: torch.zeros_like(v) for k, v in self.c.items()}

    def client_start(self, cid: int, global_state: State) -> State:
        self.received = global_state
        self.ctx.count_traffic(down=nbytes(self.c))  # c travels down beside x
        return global_state

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        c_i = self.c_local.get(cid)
        shift = [self.c[n] - c_i[n] if c_i is not None else self.c[n].clone() for n, _ in model.named_parameters()]
        trainer = self.ctx.trainer
        opt = CorrectedSGD(list(model.parameters()), shift, lr=trainer.lr, momentum=trainer.momentum,
                           weight_decay=trainer.weight_decay)
        stats = trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, optimizer=opt)
        self.steps = opt.steps
        return stats

    def cv_step(self) -> float:
        """The step size option II divides by: the run's lr, or lr / (1 - momentum) (`cv_lr`)."""
        trainer = self.ctx.trainer
        return trainer.lr if self.hp.cv_lr == "lr" else trainer.lr / (1.0 - trainer.momentum)

    @torch.no_grad()
    def upload(self, cid: int, trained: State) -> State:
        """Option II: c_i+ = c_i - c + (x - y) / (K lr); send y and Delta c = c_i+ - c_i."""
        x, k = self.received, self.steps
        if k:
            scale = 1.0 / (k * self.cv_step())
            delta_c = {n: (x[n] - trained[n]).mul_(scale).sub_(self.c[n]) for n in self.param_keys}
        else:  # no step taken: nothing learned about this client, c_i stays
            delta_c = {n: torch.zeros_like(v) for n, v in self.c.items()}
        c_i = self.c_local.get(cid)
        self.c_local[cid] = ({n: c_i[n] + delta_c[n] for n in self.param_keys} if c_i is not None
                             else {n: delta_c[n].clone() for n in self.param_keys})
        return {**trained, **{DELTA_C + n: d for n, d in delta_c.items()}}

    # -- aggregation ------------------------------------------------------------------------------
    def aggregation_weight(self, cid: int, n_train: int) -> float:
        return 1.0 if self.hp.weighting == "uniform" else n_train

    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        acc = super().begin_aggregation(global_state, expected)
        acc.extra["delta_c"] = {}
        return acc

    @torch.no_grad()
    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """y into the running mean (weighted by `aggregation_weight`), Delta c into a plain sum."""
        models = {n: v for n, v in upload.payload.items() if not n.startswith(DELTA_C)}
        sums = acc.extra["delta_c"]
        for name, value in upload.payload.items():
            if name.startswith(DELTA_C):
                key = name[len(DELTA_C):]
                if key in sums:
                    sums[key].add_(value)
                else:
                    sums[key] = value.clone()
        super().accumulate(acc, Upload(upload.cid, upload.n_train, models))

    @torch.no_grad()
    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        """x <- x + global_lr (mean y - x); c <- c + (1/N) sum Delta c."""
        mean = acc.mean.result()
        eta = self.hp.global_lr
        if eta != 1.0:
            mean = {n: global_state[n] + eta * (m - global_state[n]) for n, m in mean.items()}
        n_clients = len(self.ctx.participants)  # N of the paper: the clients that train
        for name, total in acc.extra["delta_c"].items():
            self.c[name] = self.c[name] + total / n_clients
        return {**global_state, **mean}

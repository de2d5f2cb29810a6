"""FedDPA: Yang, Huang and Ye, "Dynamic Personalized Federated Learning with Adaptive Differential
Privacy", NeurIPS 2023 (code: github.com/xiyuanyang45/DynamicPFL). Run here WITHOUT differential
privacy, as the FedOBP authors ran it: no clipping of the uploaded update and no noise.

Dynamic Fisher personalization. Each client keeps its whole local model theta_i (what it had after
its last local training). When client i is sampled it computes, on its training data, the
empirical diagonal Fisher information of theta_i,

    F = mean over its training samples (x, y) of (d log p(y | x; theta_i) / d theta) ** 2

(per-sample gradients with `torch.func`), min-max normalizes F within each parameter tensor
(layer-wise, as the paper and its code; a constant tensor normalizes to 0), and marks the
personal elements, which keep the client's value theta_i; every other element takes the global
value. How the mask is drawn (`mask`):
- `value` (default; the paper and the authors' code): elements with normalized F >
  `fisher_threshold` are personal. So `fisher_threshold` >= 1 personalizes nothing (the start is
  exactly the global model) and `fisher_threshold` < 0 personalizes everything; how many elements
  are personal depends on the shape of each tensor's Fisher distribution.
- `quantile` (the FedOBP authors' FL-bench fork, github.com/uglyghost/FedOBP,
  src/client/feddpa.py): each tensor is thresholded at the `fisher_threshold` quantile t of its
  own normalized Fisher values (`torch.quantile` there: linear interpolation between order
  statistics), and elements with F > t, strictly, as in the fork, are personal; the fork merges
  F > t from the client's model and F <= t from the global one. Since t lies between the order
  statistics of ranks r = floor(q (n - 1)) and r + 1 (0-based) and no element lies strictly
  between those, the personal elements are exactly those above the r-th smallest (the same set
  up to the rounding of the fork's interpolation): n - 1 - r of a tensor's n elements (for q = 0.4, 60% of every tensor,
  within one element), fewer where values tie at the threshold (a tie at t stays shared, as in the
  fork). `fisher_threshold` must lie in [0, 1]: 1 personalizes nothing, 0 everything but each
  tensor's minima. It takes one `kthvalue` per tensor (exact and deterministic; `torch.quantile`
  refuses tensors over 2**24 elements in older torch).

Adaptive constraint (the paper's local schedule, as in the authors' code; `schedule=paper`), from
the merged start, with the global model g received this round fixed:
1. personal phase: `local_epochs` of SGD on the personal elements only (shared ones frozen) with
   CE + lam1 / 2 * sum over tensors of ||theta - g||_2  (R1; a plain, unsquared norm per tensor,
   as in the authors' code);
2. shared phase: `local_epochs` of SGD on the shared elements only (personal ones frozen) with
   CE + lam2 / 2 * | sum over tensors of ||theta - g||_2 - bound |  (R2: keeps the update norm
   near the clipping bound C; here `bound`, although nothing is clipped).
Each phase has a fresh optimizer (the run's SGD); frozen elements are restored after every step,
so momentum and weight decay cannot move them. The personal phase draws its batches from the
"feddpa-personal" stream, the shared phase from "train" (the stream FedAvg uses). A phase with no
element to train is skipped. `schedule=flbench` instead trains all elements together for
`local_epochs` with plain cross-entropy (the baseline the FedOBP authors ran, in their FL-bench
fork, github.com/uglyghost/FedOBP, src/client/feddpa.py; it has neither regularizer nor phases).
`schedule=flbench` with `mask=quantile` is that fork's FedDPA baseline (add `first=init` for its
first participation too), up to the differences listed at the end.

Communication: the whole global model down and the whole trained model up (the paper sends the
update of every parameter, personal ones included), and the server takes the sample-weighted
mean of everything (FedAvg aggregation), as the paper (without DP) and the FedOBP authors' fork
do. The client keeps its trained model (for the next Fisher and personal values).

First participation: with `first=global` (default) a client that has never trained has no local
model, so it starts from (and is evaluated with) the global model; `first=init` reproduces the
authors' code (and their fork's), where every client's local model starts as the initial random
model, so its personal elements keep their random initial values. Evaluation uses the same
Fisher merge of the client's kept model with the current global model (deterministic, read-only).

With `fisher_threshold` >= 1 (1 with `mask=quantile`: nothing lies above a tensor's maximum)
and lam2 = 0 (lam1 is then unused) FedDPA is exactly FedAvg.

Hyperparameters:
    fisher_threshold = 0.4   threshold on the layer-wise normalized Fisher (paper, code default);
                             with mask=quantile, the quantile (the fork declares no default of
                             its own: its score-comparison script scans 0 to 1).
    mask = value             value | quantile (see above); value is the paper's rule.
    lam1 = 0.1               weight of R1 on the personal phase (authors' code default).
    lam2 = 0.05              weight of R2 on the shared phase (authors' code default).
    bound = 0.5              R2's target norm, the paper's clipping bound C (code default).
    schedule = paper         paper: the two phases above; flbench: one joint phase, plain CE.
    first = global           global | init (see above).

Where the implementations differ: the authors' code trains with Adam (here the run's SGD, like
every algorithm in this benchmark), masks gradients by `value != 0` (an element whose value is
exactly 0 is frozen; here masks come from the Fisher only) and reports the accuracy of each
sampled client's freshly trained model (here every client is evaluated with the Fisher merge of
its kept model and the current global model, as in the FedOBP authors' fork). That fork
thresholds each tensor at a quantile of its Fisher values (here `mask=quantile`), computes the
Fisher on whatever model the client object last held (FL-bench reuses one client object, so: the
previous client's trained model) rather than the client's own, divides by the number of batches
(capped at 10; irrelevant after normalization), divides 0 by 0 where a tensor's Fisher is
constant (its merge then zeroes the tensor; here the tensor takes the global values) and trains
all parameters jointly without regularizers (here `schedule=flbench`). The defaults follow the
paper: value threshold, the two regularized phases; the Fisher is always the client's own
model's.

Cost: each participation computes the Fisher of the client's model from one per-sample gradient
per training sample (`pflbench.core.fisher`: per layer from its inputs and output gradients, exact,
1.5 to 2x a batched gradient's cost and 3 to 5x faster than materializing every per-sample
gradient with `torch.func.vmap`; benchmarks/bench_fisher.py), then trains two phases; so a round costs 2.5x
FedAvg's sample-gradients at 2 local epochs (counted in `grad_evals`), and 1.3x FedAvg's time per
sample-gradient (benchmarks/bench_algorithms.py on this project's CPU: 475 against 371 ms per
1,000; 936 with the vmap Fisher), the two phases' regularizers adding a norm over every tensor at
each step. Evaluation recomputes every evaluated client's Fisher (`eval_grad_evals`).

Search space (`pflbench tune`, beside the run's learning rate): fisher_threshold in [0.1, 0.9] (the
FedOBP fork scans the whole of [0, 1]); lam1 and lam2 a decade either side of the authors' code
defaults, log scale.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.fisher import squared_sample_grads
from pflbench.core.masked import Mask, train_elements
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, min_max, set_state
from pflbench.core.training import TrainStats, cross_entropy

PERSONAL_STREAM = "feddpa-personal"


def above_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """True where an element of `x` is strictly above the q-quantile of all of `x`'s elements
    (the FedOBP fork's `x > torch.quantile(x, q)`). With r = floor(q (n - 1)), the linearly
    interpolated quantile lies between the order statistics x_(r) and x_(r+1) (0-based), and no
    element lies strictly between those two, so the set is exactly {x > x_(r)}: one `kthvalue`,
    exact and deterministic, with no interpolation to round and no `torch.quantile` (which
    refuses tensors over 2**24 elements in older torch). n - 1 - r elements, fewer where x_(r) is
    tied with larger ranks (a tie at the threshold stays below it, as in the fork)."""
    flat = x.detach().flatten()
    rank = min(max(math.floor(q * (flat.numel() - 1)), 0), flat.numel() - 1)
    return x > flat.kthvalue(rank + 1).values


@register_algorithm("feddpa")
class FedDPA(Algorithm):
    description = "Elements with high layer-normalized Fisher information keep the client's value (DP omitted)."
    citation = "Yang et al., NeurIPS 2023"
    client_state = "its last trained model (the Fisher merge is recomputed from it)"
    eval_adapt = ("Fisher merge of the current global model and the client's model ({mask} threshold "
                  "{fisher_threshold}; per-sample gradients on its training data)")

    @dataclass
    class Hyperparams:
        fisher_threshold: float = tunable(0.4, Real(0.1, 0.9))
        lam1: float = tunable(0.1, Real(0.01, 1.0, log=True))
        lam2: float = tunable(0.05, Real(0.005, 0.5, log=True))
        bound: float = 0.5
        schedule: Literal["paper", "flbench"] = "paper"
        first: Literal["global", "init"] = "global"
        mask: Literal["value", "quantile"] = "value"

        def __post_init__(self):
            if not (self.lam1 >= 0 and self.lam2 >= 0):
                raise ValueError(f"lam1 and lam2 must be >= 0 (got {self.lam1}, {self.lam2})")
            if not self.bound >= 0:
                raise ValueError(f"bound must be >= 0 (got {self.bound})")
            if self.fisher_threshold != self.fisher_threshold:
                raise ValueError("fisher_threshold must be a number")
            if self.mask == "quantile" and not 0.0 <= self.fisher_threshold <= 1.0:
                raise ValueError(f"fisher_threshold must be in [0, 1] with mask=quantile "
                                 f"(got {self.fisher_threshold})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.scratch = copy.deepcopy(ctx.model)
        self.initial: State | None = None
        self.round_global: State = {}
        self.total = sum(p.numel() for p in ctx.model.parameters())
        self.personal_sum = 0.0
        self.starts = 0

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    # -- Fisher personalization ------------------------------------------------------------------
    def fisher(self, cid: int, local: State) -> State:
        """Empirical diagonal Fisher of the model `local` on client `cid`'s training samples."""
        model = self.scratch
        set_state(model, local)
        model.eval()
        data, idx = self.ctx.trainer.data, self.ctx.clients[cid].train
        totals = squared_sample_grads(model, data.x, data.y, idx)
        self.ctx.trainer.count_grads(len(idx))  # one per-sample gradient per training sample
        return {n: t / max(1, len(idx)) for n, t in totals.items()}

    def local_model(self, cid: int) -> State | None:
        if cid in self.kept:
            return self.kept[cid]
        return self.initial if self.hp.first == "init" else None

    def personal_mask(self, cid: int, local: State) -> Mask:
        """True where the element is personal: layer-wise normalized Fisher above the threshold
        (`mask=value`) or above the tensor's `fisher_threshold` quantile (`mask=quantile`)."""
        q = self.hp.fisher_threshold
        normalized = {n: min_max(f) for n, f in self.fisher(cid, local).items()}
        if self.hp.mask == "quantile":
            return {n: above_quantile(f, q) for n, f in normalized.items()}
        return {n: f > q for n, f in normalized.items()}

    def merged(self, cid: int, global_state: State) -> tuple[State, Mask | None]:
        """The client's start: its own values where personal, the global values elsewhere."""
        local = self.local_model(cid)
        if local is None:
            return dict(global_state), None
        mask = self.personal_mask(cid, local)
        merged = dict(global_state)
        for n, m in mask.items():
            merged[n] = torch.where(m, local[n], global_state[n])
        return merged, mask

    # -- the hooks -------------------------------------------------------------------------------
    def client_start(self, cid: int, global_state: State) -> State:
        if self.initial is None:
            self.initial = {k: v.clone() for k, v in global_state.items()}
        self.round_global = global_state
        return global_state  # the Fisher merge is client work: it happens in local_train

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        start, mask = self.merged(cid, self.round_global)
        set_state(model, start)
        if mask is None:
            mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
        self.personal_sum += sum(int(m.sum()) for m in mask.values()) / self.total
        self.starts += 1
        epochs = self.ctx.config.local_epochs
        if self.hp.schedule == "flbench":
            return self.ctx.trainer.sgd(model, cid, epochs, round_)
        g = {n: self.round_global[n] for n in mask}
        stats = TrainStats()
        if any(bool(m.any()) for m in mask.values()):
            stats += train_elements(self.ctx.trainer, model, cid, epochs, round_, mask,
                                    loss_fn=self.r1_loss(g), purpose=PERSONAL_STREAM)
        shared = {n: ~m for n, m in mask.items()}
        loss = self.r2_loss(g) if self.hp.lam2 > 0 else cross_entropy
        stats += train_elements(self.ctx.trainer, model, cid, epochs, round_, shared, loss_fn=loss)
        return stats

    def r1_loss(self, g: State) -> Callable:
        lam = self.hp.lam1
        if lam == 0:
            return cross_entropy

        def loss(model, x, y):
            reg = sum(torch.linalg.vector_norm(p - g[n]) for n, p in model.named_parameters())
            return F.cross_entropy(model(x), y) + lam / 2 * reg

        return loss

    def r2_loss(self, g: State) -> Callable:
        lam, bound = self.hp.lam2, self.hp.bound

        def loss(model, x, y):
            norm = sum(torch.linalg.vector_norm(p - g[n]) for n, p in model.named_parameters())
            return F.cross_entropy(model(x), y) + lam / 2 * (norm - bound).abs()

        return loss

    def upload(self, cid: int, trained: State) -> State:
        self.kept[cid] = trained
        return trained

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.merged(cid, global_state)[0]

    def summary(self) -> dict[str, float]:
        return {"personalized_fraction": self.personal_sum / self.starts if self.starts else 0.0}

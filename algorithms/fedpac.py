"""FedPAC: Xu, Tong and Huang, "Personalized Federated Learning with Feature Alignment and
Classifier Collaboration", ICLR 2023 (arXiv:2306.11867; authors' code: github.com/JianXu95/FedPAC,
`methods/fedpac.py`, `tools.py`, `running.py`; also PFLlib `system/flcore/clients/clientpac.py`,
`servers/serverpac.py` and FL-bench `src/client/fedpac.py`, `src/server/fedpac.py`).

The body (feature extractor) is shared and averaged; the head (linear classifier) is personal, but
the server rebuilds each participant's head as a client-specific convex combination of the round's
heads, with weights from a quadratic program that trades the bias of borrowing another client's
classifier against the variance of a classifier fitted on few samples.

Schedule per round, for a sampled client i (the run's SGD, i.e. its momentum and weight decay, a
fresh optimizer per phase):
1. Down: the global body and, once they exist and `lam` > 0, the global class prototypes c_k
   (classes x D floats, and a byte per class saying which classes have one). The client starts
   from the global body under its own head (the initial head before its first participation).
2. Statistics, one forward pass of the received body over the client's n training samples
   (features z, class priors p_k = n_k / n, class means mu_k; as the authors' code
   `statistics_extraction`, computed before training on the received model):
       h_i = (p_k mu_k)_k                                      (classes x D)
       v_i = sum_k [p_k * mean over class k of ||z||^2 - p_k^2 ||mu_k||^2] / n
   The class means mu_k are also the client's fallback alignment targets.
3. Head phase: `head_epochs` of SGD on the head (body frozen), learning rate `head_lr`, batches
   from the "head" stream.
4. Body phase: `body_epochs` (-1: the run's `local_epochs`) of SGD on the body (head frozen),
   batches from "body", loss CE + lam * mean over the batch's B x D entries of (z - t_y)^2, where
   t_y is the global prototype of class y, or the client's own mu_y (step 2) for a class that has
   no global prototype; until the first global prototypes exist (round 1) the loss is plain CE,
   as in the authors' code (`round > 0`) and PFLlib.
5. The client's class prototypes after training (one forward pass of the trained body).
6. Up: the body; the head, h_i and v_i (for the combination, `combine`); the new prototypes and the
   class counts n_k (for the global prototypes, `lam` > 0).
Server (streamed: bodies into the running mean, the rest into per-round bookkeeping):
- body: sample-weighted mean, as FedAvg (authors' `agg_weight` = data size);
- global prototypes: for each class, the mean of the uploaded prototypes of the clients that have
  it, weighted by their counts of that class (`proto_weights = counts`: authors' code,
  FL-bench) or equally (`uniform`: PFLlib); classes no uploader has get no prototype this round
  (the authors replace the prototype set every round);
- heads (`combine`): for each uploader i, over the round's m uploaders j,
      minimize  a^T P_i a   subject to  a >= 0, sum_j a_j = 1,
      P_i = diag(v_1..v_m) + G_i,   G_i[j, k] = <h_i - h_j, h_i - h_k>   (h flattened),
  i.e. sum_j a_j^2 v_j (variance) + ||h_i - sum_j a_j h_j||^2 (bias), the authors'
  `get_head_agg_weight`; weights at or below `eps` are set to 0 and the rest renormalized, and
  client i's next head is sum_j a_j head_j. It is sent to client i right away (counted), and is
  what the client keeps, trains from next time and is evaluated with.
The QP. The authors (and PFLlib, FL-bench) solve it with cvxpy, which this project does not
depend on; here it is scipy.optimize's SLSQP (scipy is a dependency), on P scaled by its largest
entry (the minimizer does not change), from the uniform point, with the analytic gradient, ftol
1e-12. P is positive semidefinite by construction (a diagonal of variances plus a Gram matrix); if
rounding makes an eigenvalue negative, it is clipped to 0 (the authors instead drop eigenvalues
below 0.01 in that case). If the solver fails, or P is zero, client i keeps its own head (the
authors' fallback when their QP has no solution). `combination_weights` and `simplex_qp` are the
two functions, tested on hand-solved examples.

Evaluation: the current global body under the client's head (read-only, no training): the
authors' clients hold the latest global body (it is pushed to every client) and their head.

Exact boundary: with `lam = 0`, `combine = false` and `head_lr = -1` (the run's learning rate)
FedPAC is FedRep with `head_epochs` = FedPAC's head_epochs and `body_epochs` = its body epochs,
bit for bit (same batches, same bytes: nothing but the body travels).

Memory per client: its head (for fedavgcnn on FMNIST, 20,520 bytes). Per round, the server holds
the running mean of the bodies, the uploaders' heads, h (classes x D each) and v, and the
prototype sums, i.e. O(model + m x (head + classes x D)).

Communication per sampled client and round (float32; C classes, D = the head's input features):
down the body (engine), the global prototypes C*D*4 + C bytes (mask) when they exist and lam > 0,
and the combined head after aggregation (combine); up the body, the head + h (C*D*4) + v (4) when
combine, the prototypes (C*D*4) and counts (C*4) when lam > 0. Everything beyond the body is in
the upload payload or added with `Context.count_traffic`. For fedavgcnn on FMNIST that is, beside
the body's 2,307,584 bytes each way, 41,010 bytes down and 61,524 up.

Compute: (head_epochs + body_epochs) sample-gradients per training sample per participation;
statistics and prototypes are forward passes (not counted). The run's summary carries
`fedpac_self_weight`, the mean weight a client's combination gives its own head (1: no
collaboration).

Defaults and where they come from:
    lam = 1.0          authors' `--lam` (options.py), PFLlib `-lam`, FL-bench `lamda`.
    head_epochs = 1    authors' `epoch_classifier`, FL-bench `train_classifier_round`, PFLlib.
    body_epochs = -1   the run's local_epochs, as the authors (`local_ep_rep = local_epoch`, the
                       head epoch comes on top); FL-bench counts the head epoch inside
                       local_epochs (pass body_epochs = local_epochs - 1 for it).
    head_lr = 0.1      authors' `lr_g`, FL-bench `classifier_lr`; -1 uses the run's learning rate
                       (PFLlib, which has one optimizer).
    combine = true     authors' `agg_g = 1`; false keeps every head local.
    proto_weights = counts   authors' `protos_aggregation`, FL-bench; `uniform` is PFLlib.
    eps = 1e-3         combination weights at or below are zeroed: authors, PFLlib, FL-bench.
The authors' optimizer has momentum 0.5 and weight decay 5e-4 in both phases; here both phases use
the run's (as every algorithm in this benchmark).

Search space (`pflbench tune`, beside the run's learning rate): lam in [0.1, 10], log scale, a
decade either side of the references' 1.0 (the paper gives no grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, nbytes, subset
from pflbench.core.training import LossFn, TrainStats, cross_entropy

# upload keys of the statistics (not model tensors)
PROTOS, COUNTS, H, V = "fedpac:protos", "fedpac:counts", "fedpac:h", "fedpac:v"


def simplex_qp(P: np.ndarray, own: int, eps: float) -> np.ndarray:
    """argmin a^T P a over the probability simplex (SLSQP), entries <= eps zeroed, renormalized;
    the unit vector of `own` if the problem is degenerate (P zero or not finite) or unsolved."""
    m = P.shape[0]
    fallback = np.eye(m)[own]
    if m == 1:
        return fallback
    P = (P + P.T) / 2
    scale = np.abs(P).max()
    if not np.isfinite(scale) or scale == 0:
        return fallback
    P = P / scale
    evals, evecs = np.linalg.eigh(P)
    if evals.min() < 0:  # rounding only: P is PSD by construction
        P = (evecs * np.clip(evals, 0, None)) @ evecs.T
    from scipy.optimize import minimize  # imported on first use: it is slow to import, and only the server needs it

    res = minimize(lambda a: a @ P @ a, np.full(m, 1.0 / m), jac=lambda a: 2 * P @ a, method="SLSQP",
                   bounds=[(0.0, 1.0)] * m,
                   constraints=({"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(m)},),
                   options={"ftol": 1e-12, "maxiter": 1000})
    if not res.success or not np.all(np.isfinite(res.x)):
        return fallback
    a = np.clip(res.x, 0.0, None)
    a[a <= eps] = 0.0
    if a.sum() <= 0:
        return fallback
    return a / a.sum()


def combination_weights(v: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """FedPAC's head-combination weights (m x m, float64, row i for client i) from the clients'
    variances `v` (m) and prior-weighted class means `h` (m x C x D): row i solves the QP over
    P_i = diag(v) + G_i, G_i[j, k] = <h_i - h_j, h_i - h_k>."""
    flat = h.reshape(len(h), -1).double().cpu()
    gram = flat @ flat.t()
    var = torch.diag(v.double().cpu())
    rows = []
    for i in range(len(flat)):
        g_i = gram[i, i] - gram[i][:, None] - gram[i][None, :] + gram
        rows.append(simplex_qp((var + g_i).numpy(), i, eps))
    return torch.from_numpy(np.stack(rows))


def feature_statistics(feats: torch.Tensor, labels: torch.Tensor, num_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class means (C x D; zero for absent classes), the variance term v and the prior-weighted
    means h = (p_k mu_k)_k of one client's features (float64), as in the authors' code."""
    feats = feats.double()
    n = len(labels)
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats)
    norms = torch.zeros(num_classes, dtype=torch.float64, device=feats.device)
    norms.index_add_(0, labels, feats.square().sum(1))
    safe = counts.clamp(min=1)
    means = sums / safe[:, None]
    priors = counts / n
    v = (priors * norms / safe - priors.square() * means.square().sum(1)).sum() / n
    return means, v, priors[:, None] * means


def feature_alignment_loss(targets: torch.Tensor, lam: float) -> LossFn:
    """CE + lam * the mean squared distance of the body's features to their class's target."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.body(x)
        return F.cross_entropy(model.head(z), y) + lam * F.mse_loss(z.float(), targets[y])

    return loss_fn


@register_algorithm("fedpac")
class FedPAC(Algorithm):
    description = ("Head personal, rebuilt by the server as a QP-weighted combination of the round's heads; "
                   "body trained with features pulled to global class prototypes.")
    citation = "Xu, Tong and Huang, ICLR 2023"
    personal = "head"
    client_state = "its head (the server's combination of the heads of the last round it joined)"
    eval_adapt = "none (the global body under the client's combined head)"

    @dataclass
    class Hyperparams:
        lam: float = tunable(1.0, Real(0.1, 10.0, log=True))
        head_epochs: int = 1
        body_epochs: int = -1
        head_lr: float = 0.1
        combine: bool = True
        proto_weights: Literal["counts", "uniform"] = "counts"
        eps: float = 1e-3

        def __post_init__(self):
            if not self.lam >= 0:
                raise ValueError(f"lam must be >= 0 (got {self.lam})")
            if self.head_epochs < 0:
                raise ValueError(f"head_epochs must be >= 0 (got {self.head_epochs})")
            if self.body_epochs < -1:
                raise ValueError(f"body_epochs must be >= 0, or -1 for the run's local epochs (got {self.body_epochs})")
            if not (self.head_lr > 0 or self.head_lr == -1):
                raise ValueError(f"head_lr must be > 0, or -1 for the run's learning rate (got {self.head_lr})")
            if self.proto_weights not in ("counts", "uniform"):
                raise ValueError(f"proto_weights must be counts or uniform (got {self.proto_weights})")
            if not 0 <= self.eps < 1:
                raise ValueError(f"eps must be in [0, 1) (got {self.eps})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.global_protos: torch.Tensor | None = None  # C x D, float32
        self.proto_mask: torch.Tensor | None = None     # C, bool: which classes have one
        self.pending: dict[int, State] = {}             # statistics between local_train and upload
        self.last_alpha: dict[int, dict[int, float]] = {}
        self.self_weight_sum = 0.0
        self.combinations = 0

    @property
    def body_epochs(self) -> int:
        return self.hp.body_epochs if self.hp.body_epochs >= 0 else self.ctx.config.local_epochs

    def aligning(self) -> bool:
        return self.hp.lam > 0 and self.global_protos is not None

    # -- client side ---------------------------------------------------------------------------
    def client_start(self, cid: int, global_state: State) -> State:
        if self.aligning():  # the global prototypes travel with the body
            self.ctx.count_traffic(down=nbytes({"protos": self.global_protos, "mask": self.proto_mask}))
        return super().client_start(cid, global_state)

    def features(self, model: nn.Module, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Body features (float64) and labels of client `cid`'s training samples."""
        feats, labels = self.ctx.trainer.body_features(model, cid)
        return feats.double(), labels

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer, hp, extras = self.ctx.trainer, self.hp, {}
        aligning = self.aligning()
        if hp.combine or aligning:  # statistics of the received body
            means, v, h = feature_statistics(*self.features(model, cid), self.ctx.num_classes)
            if hp.combine:
                extras[H], extras[V] = h.float(), v.float()
        stats = TrainStats()
        if hp.head_epochs > 0:
            opt = trainer.optimizer(self.params_of(model, self.head_keys), lr=hp.head_lr if hp.head_lr > 0 else None)
            stats += trainer.sgd(model, cid, hp.head_epochs, round_, optimizer=opt, purpose="head")
        loss_fn = cross_entropy
        if aligning:
            targets = torch.where(self.proto_mask[:, None], self.global_protos, means.float())
            loss_fn = feature_alignment_loss(targets, hp.lam)
        if self.body_epochs > 0:
            stats += trainer.sgd(model, cid, self.body_epochs, round_, params=self.params_of(model, self.body_keys),
                                 loss_fn=loss_fn, purpose="body")
        if hp.lam > 0:  # the prototypes of the trained body, for the next global prototypes
            after, _, _ = feature_statistics(*self.features(model, cid), self.ctx.num_classes)
            extras[PROTOS] = after.float()
            extras[COUNTS] = self.ctx.label_counts(cid).float()
        self.pending[cid] = extras
        return stats

    def upload(self, cid: int, trained: State) -> State:
        payload = super().upload(cid, trained)  # the body; the trained head is kept until combined
        if self.hp.combine:
            payload.update(subset(trained, self.head_keys))
        payload.update(self.pending.pop(cid, {}))
        return payload

    # -- server side ---------------------------------------------------------------------------
    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        acc = super().begin_aggregation(global_state, expected)
        acc.extra.update(heads={}, v={}, h={}, proto_sum=None, proto_w=None)
        return acc

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        payload, cid = upload.payload, upload.cid
        body = subset(payload, self.body_keys)
        if body:
            acc.mean.add(body, self.aggregation_weight(cid, upload.n_train))
        if H in payload:
            acc.extra["heads"][cid] = subset(payload, self.head_keys)
            acc.extra["v"][cid], acc.extra["h"][cid] = payload[V], payload[H]
        if PROTOS in payload:
            counts = payload[COUNTS].double()
            w = counts if self.hp.proto_weights == "counts" else (counts > 0).double()
            part = w[:, None] * payload[PROTOS].double()
            if acc.extra["proto_sum"] is None:
                acc.extra["proto_sum"], acc.extra["proto_w"] = part, w
            else:
                acc.extra["proto_sum"] += part
                acc.extra["proto_w"] += w

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        new_state = super().finish_aggregation(acc, global_state)  # the bodies' mean only
        if acc.extra.get("proto_w") is not None:
            w = acc.extra["proto_w"]
            mask = w > 0
            protos = acc.extra["proto_sum"] / w.clamp(min=1e-300)[:, None]
            self.global_protos = torch.where(mask[:, None], protos, torch.zeros_like(protos)).float()
            self.proto_mask = mask
        if acc.extra.get("heads"):
            self.combine_heads(acc.extra["heads"], acc.extra["v"], acc.extra["h"])
        return new_state

    @torch.no_grad()
    def combine_heads(self, heads: dict[int, State], v: dict[int, torch.Tensor], h: dict[int, torch.Tensor]) -> None:
        """Each uploader's next head: the QP-weighted combination of the round's heads; sent to it."""
        cids = list(heads)
        alpha = combination_weights(torch.stack([v[c] for c in cids]), torch.stack([h[c] for c in cids]), self.hp.eps)
        stacked = {k: torch.stack([heads[c][k] for c in cids]) for k in self.head_keys}
        for i, cid in enumerate(cids):
            row = alpha[i].to(device=self.ctx.device, dtype=torch.float32)
            self.kept[cid] = {k: (row.view(-1, *[1] * (w.dim() - 1)) * w).sum(0) for k, w in stacked.items()}
            self.last_alpha[cid] = {c: float(alpha[i, j]) for j, c in enumerate(cids)}
            self.self_weight_sum += float(alpha[i, i])
            self.combinations += 1
        self.ctx.count_traffic(down=len(cids) * nbytes(heads[cids[0]]))

    def summary(self) -> dict[str, float]:
        if not self.combinations:
            return {}
        return {"fedpac_self_weight": self.self_weight_sum / self.combinations}

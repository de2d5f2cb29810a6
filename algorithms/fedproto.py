"""FedProto: Tan, Long, Liu, Zhou, Lu, Jiang and Zhang, "FedProto: Federated Prototype Learning
across Heterogeneous Clients", AAAI 2022 (arXiv:2105.00243; the authors' code:
github.com/yuetan031/FedProto).

No model is averaged: every client's whole model is personal (`personal = "all"`), and what the
clients share is one prototype per class, the mean representation z = body(x) of the class's
samples (the classifier's input, the features the references use: PFLlib `model.base(x)`, FL-bench
`get_last_features`, the authors' `x1`).

Round t, for each sampled client i:
1. Down: the global prototypes {c: P_c} (the classes that have one; none before the first
   aggregation), D floats and a class id each.
2. Local training: `local_epochs` of the run's SGD (fresh optimizer, the "train" batch stream, so
   the batches are Local's) on the client's own model, each mini-batch with the loss

       CE(head(z), y) + lam * sum_b [y_b has a global prototype] ||z_b - P_{y_b}||^2 / (B * D)

   i.e. the mean squared error between each feature and its label's global prototype, over all
   B * D entries of the batch, samples whose class has no global prototype contributing zero, as
   PFLlib (clientproto.py: the target row is the feature itself) and FL-bench (client/fedproto.py)
   compute it. Without any global prototype (round 1) the loss is plain cross-entropy.
3. Up: the client's local prototypes for the classes it has: the per-class mean of z, with the
   class ids and the per-class sample counts (k_i classes: k_i * D floats and 2 * k_i integers).
   The model stays on the client.
4. Server: for every class c some sampled client sent, P_c = sum_i w_ic * p_ic with weights
   summing to 1 over the clients i that sent c (see `weights`). A class nobody sent this round keeps
   its previous global prototype (`absent = keep`) or loses it (`absent = drop`).
Evaluation: see `eval`; a client that has never trained is tested with the initial model, as in
Local. The paper also lets clients have different architectures (only prototypes travel); here
every client has the benchmark's model, as in the references' statistical-heterogeneity runs.

Hyperparameters:
  lam = 1.0      weight of the prototype term: PFLlib (`-lam`/`--lamda`, default 1), FL-bench
                 (`--lamda`, default 1) and the authors' README (`--ld 1` on MNIST and FEMNIST; 0.1
                 on CIFAR-10). lam = 0 with `eval = model` is exactly Local (same batches; the
                 term adds exact zeros); only the prototypes' bytes differ.
  eval = model   how a client predicts at test time:
                 `model`: its own model (body and head), as FL-bench does and as the authors' code
                 reports beside the prototype figure ("w/o protos");
                 `prototype`: the nearest global prototype to body(x) (mean squared distance), as
                 PFLlib does (clientproto.py `test_metrics`, over every class with a global
                 prototype) and the authors' code's "with protos" figure (which also restricts the
                 candidates to the classes the client has; not offered). The scores handed to the
                 engine's loss are minus the distances; a class without a global prototype is given
                 the farthest present distance plus 100 (never predicted, finite loss; the authors
                 give such classes a fixed distance of 100). Before any global prototype exists,
                 the client's model predicts. The reported test loss is then the cross-entropy of
                 softmax(-distance), not comparable with a classifier's, and `--finetune-epochs`
                 fine-tunes the body under those scores.
                 The default is `model`: it is the predictor every client trains with cross-entropy
                 and keeps (no server state needed at test time), it makes lam = 0 exactly Local,
                 so a comparison isolates what the prototype term adds, and `--finetune-epochs`
                 fine-tunes the predictor that is tested. We could not check which of the two
                 figures the paper's tables report; its authors' code computes both.
  weights = clients   the server's weights for class c: `clients` = 1 / (number of clients that
                 sent c), the uniform mean of the authors' code (lib/utils.py `proto_aggregation`),
                 PFLlib (serverproto.py `proto_aggregation`) and FL-bench (server/fedproto.py
                 `aggregate_prototypes`); `samples` = n_ic / sum_j n_jc, the client's share of the
                 class's samples, the weighting by |D_i,c| of the paper's aggregation formula.
  protos = final how a client's local prototypes are computed: `final` = one forward pass of the
                 trained body over its training samples (the paper's local prototype, the mean
                 embedding of the class's local samples, taken for the model the client keeps;
                 forward only, not counted as gradients);
                 `train` = the features of every training mini-batch of the round, accumulated
                 while the body changes, as PFLlib and FL-bench do (no extra pass; the authors' code
                 keeps the last local epoch's only).
  absent = keep  a class that no sampled client sent this round: `keep` its previous global
                 prototype (the engine's rule for a tensor nobody sent), or `drop` it, as PFLlib and
                 FL-bench do (they rebuild the prototypes from each round's uploads; the authors'
                 code has every client in every round, where the two agree).

Search space (`pflbench tune`, beside the run's learning rate): lam in [0.1, 10], log scale, a
decade around the references' default 1 that holds the authors' 0.1 for CIFAR-10.

Memory: every client's whole model (client side, as in Local: 2,328,104 bytes for fedavgcnn on
Fashion-MNIST), and on the server one prototype per class (classes x D floats).
Communication per sampled client and round: down, k_g * (4 D + 8) bytes, k_g the number of classes
with a global prototype (0 in round 1); up, k_i * (4 D + 16) bytes, k_i the classes the client has
(prototype, class id and count as int64); for fedavgcnn (D = 512) 2,056 bytes per class down and
2,064 up, against 2,328,104 bytes for one model on Fashion-MNIST. The upload is the engine's payload (counted by the
engine); the download is not model state, so it is added with `Context.count_traffic` when the
client starts. As for every algorithm here, nothing is counted for evaluation (with `eval =
prototype` a client would need the latest prototypes).
Compute: CE and the prototype term share one forward and backward pass per sample (`Trainer.sgd`
counts it); the `final` prototype pass is forward only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, set_state
from pflbench.core.training import EVAL_BATCH, LossFn, TrainStats
from pflbench.errors import UserError

MEANS, CLASSES, COUNTS = "proto.means", "proto.classes", "proto.counts"  # the upload's tensors
ABSENT_MARGIN = 100.0  # a class without a global prototype: farthest present distance + this
ID_BYTES = 8  # a class id or a count travels as int64


class PrototypeClassifier(nn.Module):
    """Scores -||body(x) - P_c||^2 / D (the mean squared distance of PFLlib's nearest-prototype
    rule) for the classes with a global prototype; the others score below every present class."""

    def __init__(self, model: nn.Module, prototypes: torch.Tensor, present: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("prototypes", prototypes.clone())
        self.register_buffer("present", present.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.body(x).flatten(1).float()
        protos = self.prototypes
        with torch.autocast(device_type=z.device.type, enabled=False):  # distances in float32
            # ||z - p||^2 = ||z||^2 - 2 z.p + ||p||^2, without a B x C x D intermediate
            dist = (z.square().sum(1, keepdim=True) - 2 * z @ protos.t() + protos.square().sum(1)).clamp_min(0)
        dist = dist / z.shape[1]
        farthest = dist.masked_fill(~self.present, float("-inf")).amax(1, keepdim=True)
        return -torch.where(self.present, dist, farthest + ABSENT_MARGIN)


@register_algorithm("fedproto")
class FedProto(Algorithm):
    description = "Personal models regularized towards global class prototypes (mean features); only prototypes travel."
    citation = "Tan et al., AAAI 2022"
    personal = "all"
    client_state = "its whole model"

    @dataclass
    class Hyperparams:
        lam: float = tunable(1.0, Real(0.1, 10.0, log=True))
        eval: Literal["model", "prototype"] = "model"
        weights: Literal["clients", "samples"] = "clients"
        protos: Literal["final", "train"] = "final"
        absent: Literal["keep", "drop"] = "keep"

        def __post_init__(self):
            if not (self.lam >= 0 and math.isfinite(self.lam)):
                raise ValueError(f"lam must be a finite number >= 0 (got {self.lam})")
            for name, allowed in (("eval", ("model", "prototype")), ("weights", ("clients", "samples")),
                                  ("protos", ("final", "train")), ("absent", ("keep", "drop"))):
                if getattr(self, name) not in allowed:
                    raise ValueError(f"{name} must be {' or '.join(allowed)} (got {getattr(self, name)})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        head = ctx.model.head
        if not isinstance(head, nn.Linear):  # the prototypes' length is the head's input size
            raise UserError("fedproto needs a model whose head is one linear layer")
        self.dim = head.in_features
        c = ctx.num_classes
        self.prototypes = torch.zeros(c, self.dim, device=ctx.device)  # global P_c (rows of `present`)
        self.present = torch.zeros(c, dtype=torch.bool, device=ctx.device)
        self.pending: dict[int, State] = {}  # a client's prototypes between local_train and upload

    @classmethod
    def describe_eval_adaptation(cls, hp: Any) -> str:
        if getattr(hp, "eval", "model") == "prototype":
            return "nearest global prototype to the client's body features (no training)"
        return "none"

    # -- what travels ---------------------------------------------------------------------------
    def download_message(self) -> int:
        """Bytes of the global prototypes sent to one client: D floats and a class id per class."""
        k = int(self.present.sum())
        return k * (self.dim * self.prototypes.element_size() + ID_BYTES)

    def client_start(self, cid: int, global_state: State) -> State:
        self.ctx.count_traffic(down=self.download_message())
        return super().client_start(cid, global_state)

    def upload(self, cid: int, trained: State) -> State:
        super().upload(cid, trained)  # keeps the whole model on the client; nothing of it is sent
        return self.pending.pop(cid)

    # -- local training -------------------------------------------------------------------------
    def local_loss(self, sums: torch.Tensor | None, counts: torch.Tensor | None) -> LossFn:
        """CE + lam * the prototype MSE; with `sums`/`counts`, also accumulate the batch features
        per class (`protos = train`)."""
        lam, any_global = self.hp.lam, bool(self.present.any())
        prototypes, present = self.prototypes, self.present

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            z = model.body(x)
            loss = F.cross_entropy(model.head(z), y)
            z = z.flatten(1)
            if sums is not None:
                with torch.no_grad():
                    sums.index_add_(0, y, z.detach().float())
                    counts.add_(torch.bincount(y, minlength=len(counts)))
            if any_global:
                diff = (z - prototypes[y].to(z.dtype)) * present[y].unsqueeze(1).to(z.dtype)
                loss = loss + lam * diff.square().mean()
            return loss

        return loss_fn

    @torch.no_grad()
    def feature_sums(self, model: nn.Module, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class sums of body(x) over client `cid`'s training samples (one forward pass of the
        trained body) and the per-class counts."""
        model.eval()
        data, idx = self.ctx.trainer.data, self.ctx.clients[cid].train
        sums = torch.zeros(self.ctx.num_classes, self.dim, device=self.ctx.device)
        for start in range(0, len(idx), EVAL_BATCH):
            take = idx[start:start + EVAL_BATCH]
            sums.index_add_(0, data.y[take], model.body(data.x[take]).flatten(1).float())
        return sums, self.ctx.label_counts(cid)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        c = self.ctx.num_classes
        if self.hp.protos == "train":
            sums = torch.zeros(c, self.dim, device=self.ctx.device)
            counts = torch.zeros(c, dtype=torch.long, device=self.ctx.device)
        else:
            sums = counts = None
        stats = self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                                     loss_fn=self.local_loss(sums, counts))
        if sums is None:
            sums, counts = self.feature_sums(model, cid)
        classes = torch.nonzero(counts).flatten()
        # `counts` here are the features summed (times the epochs with `protos = train`); the
        # upload's counts are the client's training samples per class, the same in both modes
        self.pending[cid] = {MEANS: sums[classes] / counts[classes].unsqueeze(1).to(sums),
                             CLASSES: classes,
                             COUNTS: self.ctx.label_counts(cid)[classes]}
        return stats

    # -- the server: per-class weighted means, streamed -----------------------------------------
    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        acc = super().begin_aggregation(global_state, expected)
        c = self.ctx.num_classes
        acc.extra["sums"] = torch.zeros(c, self.dim, dtype=torch.float64, device=self.ctx.device)
        acc.extra["weights"] = torch.zeros(c, dtype=torch.float64, device=self.ctx.device)
        return acc

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        payload = upload.payload
        classes = payload[CLASSES]
        if self.hp.weights == "samples":
            w = payload[COUNTS].to(torch.float64)
        else:
            w = torch.ones(len(classes), dtype=torch.float64, device=classes.device)
        acc.extra["sums"].index_add_(0, classes, payload[MEANS].to(torch.float64) * w.unsqueeze(1))
        acc.extra["weights"].index_add_(0, classes, w)

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        weights = acc.extra["weights"]
        sent = weights > 0
        mean = acc.extra["sums"][sent] / weights[sent].unsqueeze(1)  # weights w_ic / sum_j w_jc
        if self.hp.absent == "drop":
            self.present.zero_()
            self.prototypes.zero_()
        self.prototypes[sent] = mean.to(self.prototypes.dtype)
        self.present |= sent
        return global_state  # no model is averaged

    # -- evaluation -----------------------------------------------------------------------------
    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        set_state(self.ctx.model, self.eval_state(cid, global_state))
        if self.hp.eval == "model" or not bool(self.present.any()):
            return self.ctx.model
        return PrototypeClassifier(self.ctx.model, self.prototypes, self.present)

    def summary(self) -> dict[str, Any]:
        return {"fedproto_classes": int(self.present.sum())}

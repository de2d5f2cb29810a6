"""FLUTE: Liu, Shen and Yang, "Federated Representation Learning in the Under-Parameterized
Regime", ICML 2024 (arXiv:2406.04596). (The method is FLUTE; the authors are Renpu Liu, Cong
Shen and Jing Yang.)

Shared body, personal linear heads, with regularizers on the head that push each client's
classifier towards a neural-collapse geometry over the classes it has, plus a server-side step
on the uploaded heads. This is the paper's extension beyond linear representations, with the
loss terms and defaults of FL-bench's implementation (src/client/flute.py, src/server/flute.py).

Local schedule (sampled client i, head W_i (C x D) and bias, fresh SGD optimizer over body and
head with the run's settings, one stream of `local_epochs` epochs of mini-batches):
the first `local_epochs - rep_epochs` epochs train the head only (features detached, so the body
gets no gradient and SGD leaves it untouched, weight decay included), the last `rep_epochs`
epochs train body and head together. Per mini-batch, with z = body(x):

    CE(W_i z + b_i, y)
    + lam1 * || W_i W_i^T / ||W_i W_i^T||_F - (I - 11^T / C) * (u_i u_i^T) / sqrt(C - 1) ||_F
    + lam2 * ||W_i||_F^2
    + lam3 * ||Z||_F^2          (body epochs only; Z = the batch's features, summed, not averaged)

`*` is the elementwise product and u_i the 0/1 indicator of the classes present in client i's
training data: the first term pulls the normalized Gram matrix of the head towards a simplex
equiangular tight frame over the client's classes (neural collapse, NC2). A term whose
coefficient is 0 is not computed at all.

Server: the bodies are averaged (sample-weighted). With `server_lr > 0` each client also sends
its head weight W_i and u_i (as C bytes), and the server takes one SGD step of size `server_lr`
on (1/S) * sum over the S uploaders of the NC2 term above, w.r.t. every uploaded W_i (the paper's
server step that updates "the global representation and all local heads"; in this non-linear
version, as in FL-bench, the representation is only averaged). The sum's terms are independent, so
each W_i takes its step as its upload arrives (no upload is held for the others). The updated W_i
replaces the client's head; it is sent back (counted in the download) the next time that client
is sampled, and is the head the client is evaluated with.

Hyperparameters and defaults (FL-bench's; we could not check the nonlinear defaults against the
paper's text):
  lam1 = 0.25     weight of the NC2 (ETF) term on the head
  lam2 = 0.0025   squared Frobenius norm of the head weight
  lam3 = 0.0005   squared Frobenius norm of the batch features (body epochs only)
  rep_epochs = 1  epochs at the end of local training that also train the body (FL-bench's
                  `rep_round`); the rest train the head only. >= local_epochs: all epochs joint.
  server_lr = 0.5 step size of the server's NC2 step (FL-bench's `nc2_lr`); 0 disables it and
                  the heads are then never sent.

Exact reduction: lam1 = lam2 = lam3 = 0, server_lr = 0 and rep_epochs >= local_epochs is FedPer
(body shared, head personal, plain SGD on everything for `local_epochs`), step for step: the same
batches, optimizer, loss and bytes.

Other implementations: FL-bench zeroes the body gradients during head epochs (the same as
detaching here) and computes u_i from the client's training labels, as here. A second public
port (the `flearn` FLUTE) hard-codes the coefficients and runs the server step on every client's
head every round; we follow FL-bench.

Search space (`pflbench tune`, beside the run's learning rate): lam1 and lam2 a decade either side
of FL-bench's defaults, log scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.errors import UserError
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, subset
from pflbench.core.training import TrainStats

LABELS = "flute.labels"


def nc2_term(weight: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """|| W W^T / ||W W^T||_F - (I - 11^T/C) * (u u^T) / sqrt(C-1) ||_F for one head `weight` (C x D)."""
    c = weight.shape[0]
    gram = weight @ weight.t()
    u = present.to(weight.dtype).reshape(c, 1)
    centering = torch.eye(c, dtype=weight.dtype, device=weight.device) - 1.0 / c
    target = centering * (u @ u.t()) / math.sqrt(c - 1)
    return torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - target)


@register_algorithm("flute")
class FLUTE(Algorithm):
    description = "Body shared, personal heads regularized towards neural collapse, server NC2 step on heads."
    citation = "Liu, Shen and Yang, ICML 2024"
    personal = "head"

    @dataclass
    class Hyperparams:
        lam1: float = tunable(0.25, Real(0.025, 2.5, log=True))
        lam2: float = tunable(0.0025, Real(0.00025, 0.025, log=True))
        lam3: float = 0.0005
        rep_epochs: int = 1
        server_lr: float = 0.5

        def __post_init__(self):
            if min(self.lam1, self.lam2, self.lam3) < 0:
                raise ValueError("lam1, lam2 and lam3 must be >= 0")
            if self.rep_epochs < 0:
                raise ValueError(f"rep_epochs must be >= 0 (got {self.rep_epochs})")
            if self.server_lr < 0:
                raise ValueError(f"server_lr must be >= 0 (got {self.server_lr})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        if not isinstance(ctx.model.head, nn.Linear):
            raise UserError("flute needs a model whose head is one linear layer")
        if ctx.num_classes < 2:
            raise UserError("flute needs at least 2 classes")
        self.weight_key = "head.weight"
        self.pending: set[int] = set()  # clients whose head the server changed and has not yet sent

    def present(self, cid: int) -> torch.Tensor:
        """u_i: which classes client `cid` has in its training data."""
        return self.ctx.label_counts(cid) > 0

    @property
    def head_epochs(self) -> int:
        return max(0, self.ctx.config.local_epochs - self.hp.rep_epochs)

    def download_keys(self, cid: int) -> tuple[str, ...]:
        if cid in self.pending:
            return (*self.shared_keys, self.weight_key)
        return self.shared_keys

    def client_start(self, cid: int, global_state: State) -> State:
        self.pending.discard(cid)
        return super().client_start(cid, global_state)

    def eval_state(self, cid: int, global_state: State) -> State:
        """The global body under the client's head; read-only (no `pending` bookkeeping)."""
        return {**global_state, **self.kept.get(cid, {})}

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        hp, trainer = self.hp, self.ctx.trainer
        per_epoch = math.ceil(self.ctx.clients[cid].n_train / trainer.batch_size)
        head_epochs = self.head_epochs
        present = self.present(cid)
        step = 0

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal step
            body_epoch = step // per_epoch >= head_epochs
            step += 1
            z = m.body(x)
            if not body_epoch:
                z = z.detach()
            loss = F.cross_entropy(m.head(z), y)
            weight = m.head.weight
            if hp.lam1:
                loss = loss + hp.lam1 * nc2_term(weight, present)
            if hp.lam2:
                loss = loss + hp.lam2 * weight.square().sum()
            if hp.lam3 and body_epoch:
                loss = loss + hp.lam3 * z.square().sum()
            return loss

        return trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, loss_fn=loss_fn)

    def upload(self, cid: int, trained: State) -> State:
        payload = super().upload(cid, trained)  # the body; the head is kept
        if self.hp.server_lr > 0:
            payload[self.weight_key] = trained[self.weight_key]
            payload[LABELS] = self.present(cid)
        return payload

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """The body joins the running sample-weighted mean; the head takes its server step now."""
        acc.mean.add(subset(upload.payload, self.shared_keys), self.aggregation_weight(upload.cid, upload.n_train))
        if self.hp.server_lr > 0:
            self.server_step(upload, len(acc.expected))

    def server_step(self, upload: Upload, clients: int) -> None:
        """Client `upload.cid`'s part of one SGD step on (1/S) sum_i NC2(W_i, u_i) over the round's S
        uploaded head weights: the sum's terms are independent, so each W_i steps on its own
        gradient (1/S) grad NC2(W_i, u_i) as its upload arrives, and no head waits for the others."""
        weight = upload.payload[self.weight_key].detach().requires_grad_(True)
        loss = nc2_term(weight, upload.payload[LABELS]) / clients
        (grad,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            stepped = weight - self.hp.server_lr * grad
        self.kept[upload.cid] = {**self.kept[upload.cid], self.weight_key: stepped}
        self.pending.add(upload.cid)

"""FedDBE: Zhang, Hua, Cao, Wang, Song, Xue, Ma and Guan, "Eliminating Domain Bias for Federated
Learning in Representation Space", NeurIPS 2023 (arXiv:2311.14975; the authors' code:
github.com/TsingZ0/DBE, `system/flcore/clients/clientDBE.py`, `servers/serverDBE.py`, the same
code as PFLlib's `system/flcore/clients/clientdbe.py` and `servers/serverdbe.py`).

FedAvg with the Domain Bias Eliminator (DBE), two parts acting on the body's features z = body(x):
- PRBM (personalized representation bias memory): a learnable vector b_i per client, as long as
  z, added to the features before the head: the client predicts head(z + b_i). b_i starts at zero,
  is trained with the model, and never leaves the client.
- MR (mean regularization): during local training the client keeps a running mean of its batch
  feature means, r <- (1 - momentum) * r + momentum * mean_batch(z) (reset to zero at the start of
  every local schedule; the current batch's term carries gradients into the body, the older ones
  are constants), and adds kl_weight * mean_d(0.5 * (r_d - g_d)^2) to the loss, g being the global
  feature mean. The features in r are those of the body alone, without b_i.

Global mean (as in both references' server): computed once, in an initialization period before
round 1, and fixed for the whole run. Every client (not only a sample) trains `local_epochs` of
plain cross-entropy SGD (no PRBM, no MR) from the initial global model, tracking r as above; it
sends its final r; the server's g is the sample-weighted mean of them, sent back to every client.
(Holdout clients, `--holdout-clients`, take no part: they never train.)
The models trained in that period are thrown away (the references' first round overwrites them
with the global model); its batches come from their own stream ("feddbe-init"). With
`kl_weight = 0` nothing uses g, so the period is skipped (no traffic, no compute).

Round, for each sampled client i: the global model (body and head) comes down; `local_epochs` of
the run's SGD on body, head and b_i together (one optimizer, the run's lr/momentum/weight decay),
loss CE(head(z + b_i), y) + MR; the trained body and head go up and the server takes the
sample-weighted mean (FedAvg); the client keeps b_i. The reported training loss includes the MR
term. Evaluation: client i predicts head(body(x) + b_i) with the current global model (b_i = 0 for
a client that never trained), as the references' clients test right after receiving the global
model; nothing is trained at test time.

Memory per client: b_i, one float per feature (fedavgcnn: 512 floats = 2 KB; mlp: 200), kept in
this class's dict (client side); plus one vector g and, until the initialization period is over,
one copy of the initial model. Communication per round: the whole model down and up per sampled
client, exactly FedAvg's. Once, in the initialization period (kl_weight > 0): every client
receives the initial model and g and sends r, i.e. N * (model + 2 * features) floats, added with
`count_traffic`.

Hyperparameters:
  kl_weight = 50    kappa, the weight of MR (the name of the references' flag `-klw`). 50 is what
                    the authors' own run script uses (`system/run_me.sh` in TsingZ0/DBE, FMNIST with
                    Dir(0.1): `-klw 50 -mo 1`); the argparse default of both references is 0, which
                    switches MR off.
  momentum = 1.0    mu, the running-mean momentum: 1 (the same run script) makes r the current batch's
                    feature mean; the argparse default of both references' `main.py` is 0.1 (an
                    exponential average over the schedule's batches), available as `--hp momentum=0.1`.
  prbm = true       false freezes b_i at zero (no PRBM): with kl_weight = 0 as well the run is exactly
                    FedAvg (tested).

Where this differs from the references: the references train b_i with an optimizer of its own
(plain SGD at the client's learning rate) beside the model's plain SGD; here one optimizer with the
run's settings holds both, which is the same update when the run's momentum and weight decay are 0
(their setting). The references run the initialization period inside the server's constructor;
here it runs when round 1 begins (before any client of that round trains), under the run's
precision, and its sample-gradients count in the run's `grad_evals`.

Search space (`pflbench tune`, beside the run's learning rate): kl_weight in [5, 500], log scale,
a decade either side of the authors' 50 (the paper's own grid is not reproduced here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, nbytes, set_state
from pflbench.core.training import TrainStats, precision_context

INIT_STREAM = "feddbe-init"


def feature_size(model: nn.Module, probe: torch.Tensor) -> int:
    """Length of the body's feature vector: the head's `in_features` where the head is linear,
    otherwise read off one forward pass of the body on `probe` (one input)."""
    head = model.head
    if isinstance(head, nn.Linear):
        return head.in_features
    with torch.no_grad():
        return int(model.body(probe).flatten(1).shape[1])


def dbe_loss(prbm: torch.Tensor | None, global_mean: torch.Tensor | None, momentum: float,
             kl_weight: float, running: dict[str, torch.Tensor]) -> Callable:
    """The local loss CE(head(z + prbm), y) + kl_weight * mean(0.5 * (r - global_mean)^2), with
    z = body(x) and r = (1 - momentum) * r_prev + momentum * mean_batch(z) tracked in
    `running["mean"]` (detached after each batch). `prbm=None`: no bias memory; `global_mean=None`
    or `kl_weight=0`: no MR term (r is still tracked if `running` holds a mean)."""

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = net.body(x)
        logits = net.head(z if prbm is None else z + prbm)
        loss = F.cross_entropy(logits, y)
        if "mean" in running:
            r = (1.0 - momentum) * running["mean"] + momentum * z.float().mean(0)
            if global_mean is not None and kl_weight > 0:
                loss = loss + kl_weight * (0.5 * (r - global_mean).square()).mean()
            running["mean"] = r.detach()
        return loss

    return loss_fn


class BiasedFeatures(nn.Module):
    """`head(body(x) + prbm)` over the shared model and a client's representation bias."""

    def __init__(self, model: nn.Module, prbm: nn.Parameter):
        super().__init__()
        self.model = model
        self.prbm = prbm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.body(x) + self.prbm)


@register_algorithm("feddbe")
class FedDBE(Algorithm):
    description = ("FedAvg plus a personal bias vector added to the features (PRBM) and a pull of the "
                   "local feature mean to a global one (MR).")
    citation = "Zhang et al., NeurIPS 2023"
    client_state = "a representation bias vector (one float per body feature), client side"
    eval_adapt = "none (the global model with the client's bias vector added to its features)"

    @dataclass
    class Hyperparams:
        kl_weight: float = tunable(50.0, Real(5.0, 500.0, log=True))
        momentum: float = 1.0
        prbm: bool = True

        def __post_init__(self):
            if not self.kl_weight >= 0:
                raise ValueError(f"kl_weight must be >= 0 (got {self.kl_weight})")
            if not 0.0 < self.momentum <= 1.0:
                raise ValueError(f"momentum must be in (0, 1] (got {self.momentum})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.dim = feature_size(ctx.model, ctx.trainer.data.x[:1])
        self.prbm = nn.Parameter(torch.zeros(self.dim, device=ctx.device))  # scratch, loaded per client
        self.prbms: dict[int, torch.Tensor] = {}
        self.global_mean: torch.Tensor | None = None
        # the initial global model (what the engine reads right after this constructor), kept
        # until the initialization period has used it
        self.initial: State | None = get_state(ctx.model) if hp.kl_weight > 0 else None
        self.eval_net = BiasedFeatures(ctx.model, self.prbm)

    # -- the initialization period: the global feature mean --------------------------------------
    def begin_round(self, round_: int, sampled: list[int]) -> None:
        if self.global_mean is None and self.hp.kl_weight > 0:
            self.initialize()

    def init_running_mean(self, cid: int, model: nn.Module) -> torch.Tensor:
        """Client `cid`'s running feature mean after `local_epochs` of plain cross-entropy SGD from
        the initial model (no PRBM, no MR), as in the references' initialization period."""
        set_state(model, self.initial)
        running = {"mean": torch.zeros(self.dim, device=self.ctx.device)}
        loss_fn = dbe_loss(None, None, self.hp.momentum, 0.0, running)
        self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, 0, loss_fn=loss_fn, purpose=INIT_STREAM)
        return running["mean"]

    def initialize(self) -> None:
        """Every client that trains (holdout clients never do) trains once from the initial model
        and sends its running mean; the global mean is their sample-weighted mean, sent back."""
        clients, model = self.ctx.clients, self.ctx.model
        members = self.ctx.participants
        total = sum(clients[cid].n_train for cid in members)
        mean = torch.zeros(self.dim, device=self.ctx.device)
        vector_bytes = self.dim * mean.element_size()
        with precision_context(self.ctx.config.precision, self.ctx.device):
            for cid in members:
                mean += self.init_running_mean(cid, model) * (clients[cid].n_train / total)
                self.ctx.count_traffic(down=nbytes(self.initial) + vector_bytes, up=vector_bytes)
        self.global_mean = mean
        self.initial = None

    # -- the round --------------------------------------------------------------------------------
    def load_prbm(self, cid: int) -> nn.Parameter:
        with torch.no_grad():
            stored = self.prbms.get(cid)
            if stored is None:
                self.prbm.zero_()
            else:
                self.prbm.copy_(stored)
        return self.prbm

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer = self.ctx.trainer
        prbm = self.load_prbm(cid) if self.hp.prbm else None
        tracked = self.global_mean is not None and self.hp.kl_weight > 0
        running = {"mean": torch.zeros(self.dim, device=self.ctx.device)} if tracked else {}
        loss_fn = dbe_loss(prbm, self.global_mean, self.hp.momentum, self.hp.kl_weight, running)
        params = [*model.parameters(), *([prbm] if prbm is not None else [])]
        stats = trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                            optimizer=trainer.optimizer(params), loss_fn=loss_fn)
        if prbm is not None:
            self.prbms[cid] = prbm.detach().clone()
        return stats

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        set_state(self.ctx.model, global_state)
        if not self.hp.prbm:
            return self.ctx.model
        self.load_prbm(cid)
        return self.eval_net

    def summary(self) -> dict[str, float]:
        if self.global_mean is None:
            return {}
        return {"feddbe_global_mean_norm": float(self.global_mean.norm())}

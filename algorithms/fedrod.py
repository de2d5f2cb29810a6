"""FedRoD: Chen and Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022 (arXiv:2107.00778).

Two predictors on one shared body: a generic head (G-head), shared and averaged with the body,
trained with a class-balanced loss so every client optimizes a consistent objective; and a
personal head (P-head) per client that learns a residual on top of the generic predictor.

Local schedule (per sampled client, `local_epochs` of SGD, one fresh optimizer over body, G-head
and the client's P-head, the run's lr/momentum/weight decay), on every mini-batch:

    z = body(x);  g = G-head(z);  p = P-head(z.detach())
    loss = BSM(g, y; n_i) + CE(g.detach() + p, y)

where BSM is the balanced softmax loss (Ren et al., NeurIPS 2020): cross-entropy of
`g + log n_i,c`, n_i the client's training class counts. The stop-gradients make the two losses
independent: the body and G-head follow only the BSM loss, the P-head only the personalized
loss (the paper's "P-head trained on top of the generic model"); since SGD is per parameter,
one optimizer over both groups is the same as PFLlib's two optimizers. The reported training
loss is the sum of the two. We add `log(n_c / max_c n_c)` rather than `log n_c`: a per-row
constant, so the loss is the same, and with equal counts the shift is exactly 0, i.e. BSM is
then exactly plain cross-entropy. A class the client does not have (n_c = 0) gets a shift of
-inf: it leaves the local softmax (its generic logit gets zero gradient locally), which is the
limit n_c -> 0 of the balanced softmax; losses and gradients stay finite.

Communication: body and G-head (the whole model) are sent down and up and averaged
(sample-weighted); the P-head never leaves the client. Evaluation: client i predicts with
G-head(z) + P-head_i(z) on the global body (a scratch module wrapping the shared model).

Hyperparameter:
  pinit = "zero" (default): a client's P-head starts at zero, so the personalized predictor starts
      exactly at the generic one (the residual reading of the paper, which gives no
      initialization for the linear P-head); a never-trained client is evaluated with exactly
      the global model. "generic": a copy of the initial (random) G-head, as PFLlib and FL-bench
      do (`deepcopy` of the model's classifier when the client is created).

Where published implementations differ: PFLlib (clientrod.py) matches the schedule above (BSM
step, then a CE step on `out_g.detach() + pred(rep.detach())`), with log(0) = -inf for absent
classes as here. FL-bench (client/fedrod.py) adds the two losses but its personalized logits are
the P-head alone (no residual) and its P-head loss also trains the body; at test time it uses the
P-head alone (or the G-head alone), never the sum. We follow the paper. FL-bench's optional
hypernetwork that generates P-heads (the paper's "FedRoD (hyper)") is not implemented.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.state import State, set_state
from pflbench.core.training import TrainStats


def log_prior_shift(counts: torch.Tensor) -> torch.Tensor:
    """`log(n_c / max n)`: 0 for the most frequent classes, -inf for absent ones."""
    counts = counts.to(torch.get_default_dtype())
    return torch.log(counts / counts.max())


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Balanced softmax loss: cross-entropy of `logits + log n_y` (up to a per-row constant)."""
    return F.cross_entropy(logits + log_prior_shift(counts).to(logits), y)


class GenericPlusPersonal(nn.Module):
    """`G-head(body(x)) + P-head(body(x))` over the shared model and a personal head."""

    def __init__(self, model: nn.Module, personal_head: nn.Module):
        super().__init__()
        self.model = model
        self.personal_head = personal_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.body(x)
        return self.model.head(z) + self.personal_head(z)


@register_algorithm("fedrod")
class FedRoD(Algorithm):
    description = "Body + generic head (balanced softmax) shared; a personal residual head per client."
    citation = "Chen and Chao, ICLR 2022"
    client_state = "a personal head"
    newcomer = "the global body and generic head (its personal head starts at zero)"
    eval_adapt = "sum of the global head's and the client's personal head's logits (no training)"

    @dataclass
    class Hyperparams:
        pinit: Literal["zero", "generic"] = "zero"

        def __post_init__(self):
            if self.pinit not in ("zero", "generic"):
                raise ValueError(f"pinit must be zero or generic (got {self.pinit})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.phead = copy.deepcopy(ctx.model.head)
        if hp.pinit == "zero":
            self.initial_phead = {k: torch.zeros_like(v) for k, v in self.phead.named_parameters()}
        else:
            self.initial_phead = {k: v.detach().clone() for k, v in self.phead.named_parameters()}
        self.personal_heads: dict[int, State] = {}
        self.eval_net = GenericPlusPersonal(ctx.model, self.phead)

    def load_personal_head(self, cid: int) -> nn.Module:
        """The scratch P-head module loaded with client `cid`'s head (or the initial one)."""
        set_state(self.phead, self.personal_heads.get(cid, self.initial_phead))
        return self.phead

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        counts = self.ctx.label_counts(cid)
        phead = self.load_personal_head(cid)
        phead.train()

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            z = m.body(x)
            g = m.head(z)
            personal = F.cross_entropy(g.detach() + phead(z.detach()), y)
            return balanced_softmax_loss(g, y, counts) + personal

        trainer = self.ctx.trainer
        opt = trainer.optimizer([*model.parameters(), *phead.parameters()])
        stats = trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, optimizer=opt, loss_fn=loss_fn)
        self.personal_heads[cid] = {k: v.detach().clone() for k, v in phead.named_parameters()}
        return stats

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A newcomer has no personalized head of its own: the global body and generic head with
        the initial P-head (zero by default, so the generic predictor alone, the paper's
        G-FedRoD for clients it has not seen)."""
        return self.eval_model(cid, global_state)

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        set_state(self.ctx.model, global_state)
        self.load_personal_head(cid)
        return self.eval_net

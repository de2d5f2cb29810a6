"""Ditto: Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021.

Two models per client: the global model w, trained and averaged exactly as in FedAvg, and a
personal model v_k that never leaves the client. Schedule per sampled client k in round t, both
phases starting from what the client holds at the start of the round (their order does not
matter: neither reads the other's result):

1. personal phase: `personal_epochs` of SGD (the run's optimizer, fresh each round) on v_k with
   the loss CE_k(v) + lam/2 * ||v - w^t||^2, where w^t is the global model received this round
   (kept fixed during the phase). Batches come from the "train" stream, the one Local uses.
2. global phase: `local_epochs` of plain SGD on w from w^t, batches from the "ditto-global"
   stream; the result is uploaded and the server takes the sample-weighted mean (FedAvg).

v_k starts as the initial global model w^0 (the paper's Algorithm 1 input v_k^0 = w^0; FL-bench
and PFLlib do the same), so a client never sampled yet is evaluated with w^0. Clients are
evaluated with v_k. Communication: the whole global model down and up; v_k is never sent.
The reported training loss is the personal objective (CE plus the proximal term), i.e. of the
model that is evaluated. The global phase's loss is checked for divergence but not reported.

Memory: one personal model per client that has trained (what the method needs), plus one copy
of w^0 and one scratch model.

Hyperparameters:
    lam = 1.0              weight of the proximal term. The paper selects lam per device on
                           validation data from {0.05, 0.1, 0.2} under strong attacks and from
                           {0.1, 1, 2} otherwise, and uses a fixed lam = 1 for devices with too
                           few validation samples outside strong attacks; 1 is also FL-bench's
                           default. lam = 0 gives exactly Local (v_k trains alone on the very
                           batches Local uses); large lam pulls v_k to the global model.
    personal_epochs = -1   epochs of the personal phase; -1 means `local_epochs` (the paper runs
                           the same number of local iterations s for both; FL-bench and PFLlib
                           default to 1 personal epoch).

Where the implementations differ: PFLlib trains v_k before w and FL-bench after; both anchor v_k
to the received w^t, as the paper does, so the order is immaterial (here too). FL-bench drives
both models with one optimizer carrying two parameter groups; here each phase has its own fresh
optimizer, as the paper's two separate local solvers.

Search space (`pflbench tune`, beside the run's learning rate): lam in [0.05, 2], log scale: the
union of the paper's per-device validation grids ({0.05, 0.1, 0.2} and {0.1, 1, 2}).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.regularizers import proximal_loss
from pflbench.core.state import State, get_state, set_state
from pflbench.core.training import TrainStats

GLOBAL_STREAM = "ditto-global"


@register_algorithm("ditto")
class Ditto(Algorithm):
    description = "FedAvg global model plus a personal model per client pulled to it by lam/2 ||v - w||^2."
    citation = "Li et al., ICML 2021"
    client_state = "a personal model"

    @dataclass
    class Hyperparams:
        lam: float = tunable(1.0, Real(0.05, 2.0, log=True))
        personal_epochs: int = -1

        def __post_init__(self):
            if not self.lam >= 0:
                raise ValueError(f"lam must be >= 0 (got {self.lam})")
            if self.personal_epochs < -1:
                raise ValueError("personal_epochs must be >= 0 (or -1 for local epochs)")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.initial: State = get_state(ctx.model)  # w^0: the engine builds the algorithm before training
        self.personal_models: dict[int, State] = {}
        self.scratch = copy.deepcopy(ctx.model)

    @property
    def personal_epochs(self) -> int:
        return self.ctx.config.local_epochs if self.hp.personal_epochs < 0 else self.hp.personal_epochs

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def client_start(self, cid: int, global_state: State) -> State:
        return global_state

    def personal_state(self, cid: int) -> State:
        return self.personal_models.get(cid, self.initial)

    def train_personal(self, cid: int, received: State, round_: int) -> TrainStats:
        """The personal phase: v_k <- SGD on CE + lam/2 ||v - received||^2, kept on the client."""
        model = self.scratch
        set_state(model, self.personal_state(cid))
        stats = self.ctx.trainer.sgd(model, cid, self.personal_epochs, round_,
                                     loss_fn=proximal_loss(received, self.hp.lam), purpose="train")
        self.personal_models[cid] = get_state(model)
        return stats

    def train_global(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        """The global phase: plain local SGD on the received global model (FedAvg's update)."""
        return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, purpose=GLOBAL_STREAM)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        received = get_state(model)  # w^t
        stats = self.train_personal(cid, received, round_)
        global_stats = self.train_global(cid, model, round_)
        if global_stats.samples and not math.isfinite(global_stats.loss_sum):
            raise FloatingPointError(f"Ditto's global-model loss is {global_stats.loss_sum} in round "
                                     f"{round_}; lower --lr")
        return stats

    def upload(self, cid: int, trained: State) -> State:
        return trained

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.personal_state(cid)

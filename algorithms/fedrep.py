"""FedRep: Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021.

Schedule per round, from the global body and the client's own head: first `head_epochs` of SGD
on the head with the body frozen, then `body_epochs` on the body with the head frozen (a fresh
optimizer for each phase). Only the body is sent and averaged; the head stays personal.

Defaults: body_epochs = 1 and head epochs = local epochs - body epochs, as FL-bench's FedRep
(src/client/fedrep.py, `train_body_epoch` = 1; kept by the FedOBP authors' fork, which ran it as
their baseline): the round's `local_epochs` are split between the two phases. So with
`local_epochs` = 2 (the committed FMNIST grid) the head gets 1 epoch and the body 1; with the
FedOBP protocol's 5, the head 4 and the body 1. The paper itself trains the head for many epochs
(10 on CIFAR) and the body for 1. One deliberate difference from FL-bench: with `local_epochs`
= 1 FL-bench trains only the body (its head is then never trained and stays at its
initialization); here the head always gets at least one epoch (`head_epochs = -1` means
max(1, local epochs - body epochs)). FL-bench also freezes a phase by zeroing its gradients
under one optimizer, so momentum still moves the frozen part; here each phase's optimizer holds
only the parameters it trains.

Search space (`pflbench tune`, beside the run's learning rate): head_epochs in {1..10}, up to the
paper's 10 head epochs (the default, -1, is FL-bench's split of the round's epochs).
"""

from dataclasses import dataclass

from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Integer, tunable
from pflbench.core.training import TrainStats


@register_algorithm("fedrep")
class FedRep(Algorithm):
    description = "Head personal; each round train the head (body frozen), then the body (head frozen)."
    citation = "Collins et al., ICML 2021"
    personal = "head"

    @dataclass
    class Hyperparams:
        head_epochs: int = tunable(-1, Integer(1, 10))
        body_epochs: int = 1

        def __post_init__(self):
            if self.head_epochs < -1 or self.body_epochs < 0:
                raise ValueError("head_epochs must be >= 0 (or -1 for local epochs - body epochs), body_epochs >= 0")

    @property
    def head_epochs(self) -> int:
        if self.hp.head_epochs >= 0:
            return self.hp.head_epochs
        return max(1, self.ctx.config.local_epochs - self.hp.body_epochs)

    def train_head(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        return self.ctx.trainer.sgd(model, cid, self.head_epochs, round_,
                                    params=self.params_of(model, self.personal_keys), purpose="head")

    def train_body(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        return self.ctx.trainer.sgd(model, cid, self.hp.body_epochs, round_,
                                    params=self.params_of(model, self.shared_keys), purpose="body")

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        stats = self.train_head(cid, model, round_)
        stats += self.train_body(cid, model, round_)
        return stats

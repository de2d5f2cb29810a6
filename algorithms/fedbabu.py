"""FedBABU: Oh, Kim and Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022.

Schedule: the head stays at its random initialization and is frozen throughout federated
training; each sampled client trains only the body for `local_epochs` of SGD and sends it; the
server averages bodies (sample-weighted). The frozen head is never sent (every client has the
same initial head). At evaluation each client fine-tunes the whole model from the global one for
`finetune_epochs` (default 5) on its training data and is tested with the result.

Search space (`pflbench tune`, beside the run's learning rate): finetune_epochs in {1..10}.
"""

from dataclasses import dataclass

from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Integer, tunable
from pflbench.core.state import State, get_state, set_state
from pflbench.core.training import TrainStats


@register_algorithm("fedbabu")
class FedBABU(Algorithm):
    description = "Head frozen at init while the body is federated; clients fine-tune before testing."
    citation = "Oh et al., ICLR 2022"
    newcomer = "the global model with its head fine-tuned on its data (as every client at test time)"
    eval_adapt = "fine-tune {finetune_epochs} epochs (whole model, from the global one)"

    @dataclass
    class Hyperparams:
        finetune_epochs: int = tunable(5, Integer(1, 10))

        def __post_init__(self):
            if self.finetune_epochs < 0:
                raise ValueError("finetune_epochs must be >= 0")

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.body_keys

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                                    params=self.params_of(model, self.body_keys))

    def upload(self, cid: int, trained: State) -> State:
        return {k: trained[k] for k in self.body_keys}

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A newcomer does what every client does at test time, which needs no history: it
        fine-tunes the global model's head on its own data (the paper's personalization)."""
        return self.eval_model(cid, global_state)

    def eval_state(self, cid: int, global_state: State) -> State:
        model = self.ctx.model
        set_state(model, global_state)
        self.ctx.trainer.sgd(model, cid, self.hp.finetune_epochs, round_=0, purpose="fedbabu-finetune")
        return get_state(model)

"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020.

Schedule: each sampled client receives the global model w^t and runs `local_epochs` of SGD (the
run's optimizer, a fresh one each round, the same "train" batch stream as FedAvg) on the
proximal local objective

    h_k(w; w^t) = CE_k(w) + mu/2 * ||w - w^t||^2

whose extra gradient mu * (w - w^t) is computed by autograd on every mini-batch. The client
uploads its whole model and the server takes the sample-weighted mean (exactly FedAvg's
aggregation). FedProx is not personalized: every client is evaluated with the global model.
The reported training loss is the value of h_k (cross-entropy plus the proximal term).

Hyperparameter:
    mu = 0.01   weight of the proximal term. The paper tunes mu in {0.001, 0.01, 0.1, 1} per
                dataset; 0.01 is FL-bench's default and a middle value of that grid that keeps
                local models close to the global one without freezing them. mu = 0 is exactly
                FedAvg (same batches, same arithmetic: the proximal term then adds exact zeros).

Differences from the paper, and where the public implementations stand:
- The paper's systems-heterogeneity part (stragglers doing a variable amount of local work,
  gamma-inexact solutions) is not modelled: every sampled client does the full local schedule,
  as in FL-bench and PFLlib.
- The paper samples devices with probability p_k and averages uniformly; here clients are
  sampled uniformly (the engine's schedule) and averaged with weights n_k, as FedAvg is in this
  benchmark (PFLlib and FL-bench also use sample-weighted averaging).
- FL-bench and PFLlib add mu * (w - w^t) to the gradient inside the optimizer step; here it comes
  from the loss, which is the same gradient (the value of the reported loss includes the term).

Search space (`pflbench tune`, beside the run's learning rate): mu in [0.001, 1], log scale: the
range of the paper's grid {0.001, 0.01, 0.1, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.regularizers import proximal_loss
from pflbench.core.state import State, get_state
from pflbench.core.training import LossFn, TrainStats


@register_algorithm("fedprox")
class FedProx(Algorithm):
    description = "FedAvg whose local objective adds mu/2 ||w - w_global||^2; clients use the global model."
    citation = "Li et al., MLSys 2020"

    @dataclass
    class Hyperparams:
        mu: float = tunable(0.01, Real(0.001, 1.0, log=True))

        def __post_init__(self):
            if not self.mu >= 0:
                raise ValueError(f"mu must be >= 0 (got {self.mu})")

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def local_loss(self, anchor: State) -> LossFn:
        """The proximal local objective around the received global model `anchor`."""
        return proximal_loss(anchor, self.hp.mu)

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        anchor = get_state(model)  # the global model this client received, w^t
        return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                                    loss_fn=self.local_loss(anchor))

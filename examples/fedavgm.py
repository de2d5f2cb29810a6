"""FedAvgM, a complete third-party pflbench plugin: FedAvg with server momentum.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335, 2019.

Clients run plain local SGD (the engine's default hooks). The server treats the averaged
client update as a pseudo-gradient and applies it with momentum:

    delta  = global - mean(client models)
    v      = beta * v + delta
    global = global - server_lr * v

With beta = 0 and server_lr = 1 this is exactly FedAvg.

Use it without installing anything:
    pflbench run --plugin examples/fedavgm.py --algo fedavgm --hp beta=0.9
"""

from dataclasses import dataclass

from pflbench import Algorithm, register_algorithm


@register_algorithm("fedavgm")
class FedAvgM(Algorithm):
    description = "FedAvg with server momentum on the averaged update."
    citation = "Hsu et al., arXiv:1909.06335, 2019"

    @dataclass
    class Hyperparams:
        beta: float = 0.9
        server_lr: float = 1.0

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.velocity = None

    def finish_aggregation(self, acc, global_state):
        """The engine has streamed every upload into the weighted mean; step from it with momentum."""
        mean = super().finish_aggregation(acc, global_state)
        delta = {k: global_state[k] - mean[k] for k in mean}
        if self.velocity is None:
            self.velocity = delta
        else:
            self.velocity = {k: self.velocity[k] * self.hp.beta + delta[k] for k in delta}
        return {k: global_state[k] - self.hp.server_lr * self.velocity[k] for k in global_state}

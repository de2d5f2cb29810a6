"""FedAvg: McMahan, Moore, Ramage, Hampson and Aguera y Arcas, "Communication-Efficient Learning
of Deep Networks from Decentralized Data", AISTATS 2017.

Schedule: each sampled client runs `local_epochs` of SGD from the global model and uploads the
whole model; the server takes the sample-weighted mean. Every client is evaluated with the
global model (add `--finetune-epochs K` for FedAvg-FT). The engine's default hooks are exactly
this algorithm, so the class only names it.
"""

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    description = "Federated averaging of the whole model; clients use the global model."
    citation = "McMahan et al., AISTATS 2017"

"""Local: every client trains alone on its own data and nothing is communicated.

The lower reference point of personalized FL (as in the FedOBP paper, FL-bench and PFLlib):
each client starts from the same random initialization and keeps its whole model; each round
it trains `local_epochs` of SGD on its own samples.
"""

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm


@register_algorithm("local")
class Local(Algorithm):
    description = "Each client trains only on its own data; no communication."
    citation = "baseline (no federation)"
    personal = "all"

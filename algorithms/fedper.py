"""FedPer: Arivazhagan, Aggarwal, Singh and Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019.

Schedule: each sampled client trains the whole model for `local_epochs` of SGD, starting from
the global body and its own head; only the body is sent and averaged (sample-weighted), the head
stays on the client. Clients are evaluated with the global body and their own head (a client
never sampled yet has the initial head).
"""

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm


@register_algorithm("fedper")
class FedPer(Algorithm):
    description = "Body shared and averaged, classifier head personal."
    citation = "Arivazhagan et al., arXiv:1912.00818, 2019"
    personal = "head"

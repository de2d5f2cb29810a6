"""FedBN: Li, Jiang, Zhang, Kamp and Dou, "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021.

FedAvg in which every BatchNorm layer stays on its client: the layer's affine weight and bias and
its running mean and variance are never sent and never averaged; every other tensor is trained
and averaged exactly as in FedAvg (sample-weighted mean). The paper's Algorithm 1 keeps the BN
parameters local and says the running statistics are local too; FL-bench
(src/client/fedbn.py: BN layers' parameters and buffers in the personal state) and PFLlib
(clientbn: it skips the BN layers when it receives the global model) do the same. The BN layers
are found by module type (`torch.nn.modules.batchnorm._BatchNorm`), not by a name.

It needs a model with BatchNorm layers: `--model auto` (the default) gives it `fedavgcnn_bn`
(FedAvgCNN with a BN layer after each convolution) on images of 16x16 and more and `smallcnn_bn`
on digits; on an explicitly chosen model without BatchNorm it would be FedAvg under another name,
so it stops with a one-line error. Compare it with FedAvg on the same BN model (`--model
fedavgcnn_bn` for both).

Schedule per round: the client receives the non-BN tensors, trains every parameter for
`local_epochs` from them under its own BN layers (a client never sampled before starts from the
initial BN layers: weight 1, bias 0, mean 0, variance 1, as in FL-bench and PFLlib, which copy the
initial model to every client), keeps its BN layers, and uploads the rest.
Evaluation: the current global model under the client's own BN layers (no training).
Kept per client: its BN layers (for fedavgcnn_bn: 2 x (32 + 64) x 2 float tensors' elements,
384 floats = 1.5 KB). Communication: the model minus its BN layers, each way.
No hyperparameters (the paper has none beyond FedAvg's).
"""

from __future__ import annotations

from pflbench.core.algorithm import Algorithm
from pflbench.core.models import norm_state_keys
from pflbench.core.registry import register_algorithm
from pflbench.errors import UserError


@register_algorithm("fedbn")
class FedBN(Algorithm):
    description = "FedAvg with every BatchNorm layer (weights and running statistics) kept on its client."
    citation = "Li et al., ICLR 2021"
    client_state = "its BatchNorm layers (affine weights and running statistics)"
    model_needs = "batchnorm"

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        norm = set(norm_state_keys(ctx.model))
        if not norm:
            raise UserError(f"fedbn needs a model with BatchNorm layers; model '{ctx.config.model}' "
                            "has none (use --model fedavgcnn_bn)")
        self.personal_keys = tuple(k for k in self.all_keys if k in norm)
        self.shared_keys = tuple(k for k in self.all_keys if k not in norm)

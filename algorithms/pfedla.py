"""pFedLA: Ma, Zhang, Guo and Xu, "Layer-wised Model Aggregation for Personalized Federated
Learning", CVPR 2022 (no official code; the references are FL-bench, `src/server/pfedla.py`, and
the unofficial reproduction github.com/KarhouTam/pFedLA, `src/server/pFedLA.py` and
`src/utils/models.py`, by FL-bench's author).

The server keeps every client's model theta_j (all start as the initial global model, as in
FL-bench) and, per client i, a small hypernetwork HN_i: an embedding v_i (`embed_dim` floats),
an MLP of three Linear + ReLU layers of width `hidden_dim`, and per layer l of the target model a
Linear(hidden_dim, N) whose output, made non-negative by a ReLU and divided by its sum, is the
row alpha_i^l of layer-wise aggregation weights over the N clients (alpha_ij^l >= 0,
sum_j alpha_ij^l = 1; where a row sums to 0 the client takes its own layer, as FL-bench does).
These output layers start with weights U(0, 1) and zero bias, as in both references (so the
first weights are positive and close to uniform); the rest has PyTorch's default
initialization; each client's hypernetwork is drawn from its own generator, seeded by the run's
seed and the client, as the unofficial code builds one hypernetwork per client.

Round, for each sampled client i:
1. `client_start` (server): theta_bar_i^l = sum_j alpha_ij^l theta_j^l for every layer l, sent
   down (the whole model);
2. the client trains theta_bar_i (`local_epochs` of the run's SGD) into theta_i' and sends the
   update delta_i = theta_i' - theta_bar_i;
3. `accumulate` (server, per upload): HN_i takes one SGD step (`hn_lr`, no momentum) on
   (d theta_bar_i / d (phi_i, v_i))^T (theta_bar_i - theta_i'), the vector-Jacobian product
   backpropagated through the weighted sum (its gradient in alpha_ij^l is
   <theta_j^l, theta_bar_i^l - theta_i'^l>) and the normalization; descent along it moves
   theta_bar_i towards theta_i', as pFedHN's update (which pFedLA's builds on) does. The client's
   new model theta_i = theta_bar_i + delta_i is set aside;
4. `finish_aggregation`: the round's new models replace the stored ones. All of a round's clients
   thus aggregate the models as they were at the round's start (synchronous rounds: an upload
   never changes what the round's other clients start from). Both references store a client's
   new model right after it trains, so later clients of the same round mix it in.
Only HN_i moves with client i's upload, so its step is taken at once.

Evaluation (`eval=aggregate`, default): client i is tested with theta_bar_i built from the current
models and HN_i, read-only (what it would receive next; the unofficial code's `test` evaluates
this aggregate). `eval=local` tests the client's stored model instead (its last trained model;
the initial model if it never trained).

A model with BatchNorm layers: their running statistics are not mixed; each client's own travel
with its model (the unofficial code gives them weight 1 on the client's own model).

Memory kept per client (server side): its model, and its hypernetwork: embed_dim +
hidden_dim * (embed_dim + 2 * hidden_dim + 3) + L * N * (hidden_dim + 1) floats (L layers, N
clients); for fedavgcnn on FMNIST with 50 clients (L = 4) that is 582,026 + 50,600 floats,
2.5 MB per client (127 MB for the 50). Clients keep nothing. Communication per sampled client
and round: the aggregate down and the update up, both the size of the model (state), counted
exactly by the engine.

Hyperparameters (defaults):
- `hn_lr` (0.005): both references' `hn_lr 5e-3`; plain SGD, FL-bench's `hn_momentum 0.0` (the
  unofficial code subtracts hn_lr * gradient).
- `embed_dim` (100), `hidden_dim` (100): both references' `embedding_dim` and `hidden_dim`.
- `granularity` (`layer`): one weight row per layer (a module's weight and bias together), the
  paper's layer-wise aggregation and the unofficial code's per-block weights; `tensor` gives every
  parameter tensor its own row, as FL-bench's `layer_num = len(public_model_param_names)` does.
- `normalize` (`relu`): ReLU then division by the sum, both references; `softmax` takes a softmax
  of the output layer instead (its output layer then starts at zero, so the first weights are
  uniform).
- `eval` (`aggregate`): see above.

Where this differs from the references, deliberately: the hypernetwork step descends along the
vector-Jacobian product with theta_bar_i - theta_i' (both references subtract hn_lr times the
product with theta_i' - theta_bar_i, which to first order is an ascent step on the client's
loss; on digits, 6 clients, alpha 0.1, 10 rounds, hn_lr 0.05, this sign reached 85.1% and the
references' 77.6%);
FL-bench's current server also declares every parameter personal, so its clients load their stored
model over the aggregate and train from it, while here (the paper, the unofficial code) they
train from the aggregate; the rounds are synchronous (above). HeurpFedLA (the paper's variant that
keeps the k layers of highest self-weight local, FL-bench's `k`) is not implemented.

Search space (`pflbench tune`, beside the run's learning rate): hn_lr in [5e-4, 5e-2], log scale,
a decade either side of the references' 5e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.models import layer_groups
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state
from pflbench.core.training import stream_seed

MLP_LAYERS = 3  # Linear + ReLU blocks of the hypernetwork (both references)


@register_algorithm("pfedla")
class PFedLA(Algorithm):
    description = ("Each client starts from a layer-wise weighted mix of all clients' models; its own "
                   "server-side hypernetwork learns the weights.")
    citation = "Ma et al., CVPR 2022"
    client_state = "its model and its hypernetwork (embedding, MLP, one weight row per layer; server side)"
    eval_adapt = "none (the layer-wise aggregate of the current client models under its learned weights)"
    eval_adapt_local = "none (the client's model as last trained)"

    @dataclass
    class Hyperparams:
        hn_lr: float = tunable(0.005, Real(5e-4, 5e-2, log=True))
        embed_dim: int = 100
        hidden_dim: int = 100
        granularity: Literal["layer", "tensor"] = "layer"
        normalize: Literal["relu", "softmax"] = "relu"
        eval: Literal["aggregate", "local"] = "aggregate"

        def __post_init__(self):
            if not self.hn_lr >= 0:
                raise ValueError(f"hn_lr must be >= 0 (got {self.hn_lr})")
            if self.embed_dim < 1:
                raise ValueError(f"embed_dim must be >= 1 (got {self.embed_dim})")
            if self.hidden_dim < 1:
                raise ValueError(f"hidden_dim must be >= 1 (got {self.hidden_dim})")
            if self.granularity not in ("layer", "tensor"):
                raise ValueError(f"granularity must be 'layer' or 'tensor' (got {self.granularity!r})")
            if self.normalize not in ("relu", "softmax"):
                raise ValueError(f"normalize must be 'relu' or 'softmax' (got {self.normalize!r})")
            if self.eval not in ("aggregate", "local"):
                raise ValueError(f"eval must be 'aggregate' or 'local' (got {self.eval!r})")

    @classmethod
    def describe_eval_adaptation(cls, hp: Any) -> str:
        if getattr(hp, "eval", "aggregate") == "local":
            return cls.eval_adapt_local
        return super().describe_eval_adaptation(hp)

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        n = len(ctx.clients)
        params = dict(ctx.model.named_parameters())
        self.param_keys: tuple[str, ...] = tuple(k for k in self.all_keys if k in params)
        self.groups: list[list[str]] = (layer_groups(self.param_keys) if hp.granularity == "layer"
                                        else [[k] for k in self.param_keys])
        self.layer_of = {k: l for l, keys in enumerate(self.groups) for k in keys}
        # every client's model, one tensor per parameter with the client as first dimension
        initial = get_state(ctx.model)
        self.models: State = {k: t.unsqueeze(0).repeat(n, *([1] * t.dim())) for k, t in initial.items()}
        # every client's hypernetwork, stacked the same way
        per_client = [self.init_hypernetwork(cid) for cid in range(n)]
        self.hn: dict[str, torch.Tensor] = {name: torch.stack([h[name] for h in per_client]).to(ctx.device)
                                            for name in per_client[0]}
        self.received: tuple[int, State] | None = None  # what the training client was sent

    def init_hypernetwork(self, cid: int) -> dict[str, torch.Tensor]:
        """HN_cid's parameters (CPU), from a generator seeded by the run's seed and the client."""
        gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, "pfedla-hypernetwork", cid))
        e, h, n, layers = self.hp.embed_dim, self.hp.hidden_dim, len(self.ctx.clients), len(self.groups)
        params = {"embedding": torch.randn(e, generator=gen)}
        for i, fan_in in enumerate([e] + [h] * (MLP_LAYERS - 1)):
            bound = 1.0 / math.sqrt(fan_in)
            params[f"mlp.{i}.weight"] = (torch.rand(h, fan_in, generator=gen) * 2 - 1) * bound
            params[f"mlp.{i}.bias"] = (torch.rand(h, generator=gen) * 2 - 1) * bound
        if self.hp.normalize == "relu":
            params["out.weight"] = torch.rand(layers, n, h, generator=gen)
        else:
            params["out.weight"] = torch.zeros(layers, n, h)
        params["out.bias"] = torch.zeros(layers, n)
        return params

    # -- the weights and the aggregate -----------------------------------------------------------
    def hypernetwork(self, cid: int) -> dict[str, torch.Tensor]:
        return {name: t[cid] for name, t in self.hn.items()}

    def alphas(self, cid: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """alpha_cid: (layers, clients), every row non-negative and summing to 1. From HN_cid as
        stored, or from `params` in its place (to differentiate)."""
        p = self.hypernetwork(cid) if params is None else params
        h = p["embedding"]
        for i in range(MLP_LAYERS):
            h = F.relu(p[f"mlp.{i}.weight"] @ h + p[f"mlp.{i}.bias"])
        z = p["out.weight"] @ h + p["out.bias"]
        if self.hp.normalize == "softmax":
            return torch.softmax(z, dim=1)
        r = F.relu(z)
        total = r.sum(1, keepdim=True)
        own = F.one_hot(torch.tensor(cid, device=z.device), z.shape[1]).to(z.dtype).expand_as(z)
        return torch.where(total > 0, r / total.clamp_min(torch.finfo(z.dtype).tiny), own)

    def combine(self, alphas: torch.Tensor, cid: int) -> State:
        """theta_bar^l = sum_j alphas[l, j] theta_j^l for every parameter; state that is not a
        parameter (BatchNorm statistics) is client `cid`'s own."""
        return {k: torch.tensordot(alphas[self.layer_of[k]], m, dims=1) if k in self.layer_of else m[cid].clone()
                for k, m in self.models.items()}

    def aggregate_for(self, cid: int) -> State:
        """theta_bar_cid from the stored models and HN_cid, in float32 whatever the autocast
        context, without a graph."""
        with torch.no_grad(), torch.autocast(self.ctx.device.type, enabled=False):
            return self.combine(self.alphas(cid), cid)

    # -- the hooks -------------------------------------------------------------------------------
    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def client_start(self, cid: int, global_state: State) -> State:
        start = self.aggregate_for(cid)
        self.received = (cid, start)
        return start

    def upload(self, cid: int, trained: State) -> State:
        got, start = self.received
        assert got == cid, "upload for a client other than the one that trained"
        self.received = None
        return {k: trained[k] - start[k] for k in self.all_keys}

    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        acc = super().begin_aggregation(global_state, expected)
        acc.extra["models"] = {}
        return acc

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """HN_i's step and client i's new model (stored at the round's end)."""
        cid, delta = upload.cid, upload.payload
        with torch.autocast(self.ctx.device.type, enabled=False):
            params = {name: t.detach().clone().requires_grad_(True) for name, t in self.hypernetwork(cid).items()}
            with torch.enable_grad():
                alphas = self.alphas(cid, params)
            with torch.no_grad():
                start = self.combine(alphas.detach(), cid)  # what the client was sent, recomputed
                # d/d alpha_j^l of <theta_bar^l, -delta^l> = <theta_j^l, -delta^l>
                grad = torch.zeros_like(alphas)
                for k in self.param_keys:
                    models = self.models[k]
                    grad[self.layer_of[k]] -= models.reshape(models.shape[0], -1) @ delta[k].reshape(-1)
            alphas.backward(grad)
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is not None:
                        self.hn[name][cid].sub_(p.grad, alpha=self.hp.hn_lr)
                acc.extra["models"][cid] = {k: start[k] + delta[k] for k in self.all_keys}

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        with torch.no_grad():
            for cid, model in acc.extra.pop("models").items():
                for k, t in model.items():
                    self.models[k][cid] = t
        return global_state

    def eval_state(self, cid: int, global_state: State) -> State:
        if self.hp.eval == "local":
            return {k: m[cid] for k, m in self.models.items()}
        return self.aggregate_for(cid)

    def summary(self) -> dict[str, Any]:
        """The mean weight a client gives its own model (over clients and layers), read-only."""
        with torch.no_grad(), torch.autocast(self.ctx.device.type, enabled=False):
            own = [float(self.alphas(cid)[:, cid].mean()) for cid in range(len(self.ctx.clients))]
        return {"pfedla_self_weight": sum(own) / len(own)}

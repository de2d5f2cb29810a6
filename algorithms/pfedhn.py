"""pFedHN: Shamsian, Navon, Fetaya and Chechik, "Personalized Federated Learning using
Hypernetworks", ICML 2021 (the authors' code: github.com/AvivSham/pFedHN, `experiments/pfedhn/`
and `experiments/pfedhn_pc/`; FL-bench port: `src/server/pfedhn.py`).

The server holds a hypernetwork h(v_i; phi): one learned embedding v_i per client, an MLP
(Linear(embed_dim, hidden_dim), then `n_hidden` times ReLU + Linear(hidden_dim, hidden_dim)) and
output heads that turn the MLP's features into every parameter tensor of the target model.
No client ever sees phi or an embedding.

Round, for each sampled client i:
1. down: theta_i = h(v_i; phi), the whole generated model (`client_start`, on the server);
2. the client trains theta_i (the run's `local_epochs` of SGD with the run's optimizer, as
   FL-bench's clients do; `inner_steps` = K > 0 trains K mini-batches instead, the authors'
   schedule) and gets theta_i';
3. up: the update delta_i = theta_i' - theta_i;
4. the server takes the hypernetwork step with the vector-Jacobian product
   g_i = (d theta_i / d (phi, v))^T (theta_i - theta_i'), as the authors' code computes it
   (`delta_theta = inner_state - final_state`, then `torch.autograd.grad`; FL-bench likewise),
   so that descent along g_i moves h(v_i) towards theta_i'; g_i is clipped to norm `norm_clip`
   and applied by the hypernetwork's own SGD (`hn_lr`, `embed_lr` for the embeddings,
   `hn_momentum`, `hn_weight_decay`).
The step is taken per upload, in `accumulate`. With `server_step=client` (default) every upload
takes one optimizer step, as in the authors' code (one step per sampled node) and FL-bench's
current server (one step per client of the round). All of a round's clients receive models
generated from phi as it was at the round's start (synchronous rounds: an upload never changes
what the round's other clients start from), so each g_i is taken at that phi: `begin_round` keeps
a snapshot of the hypernetwork, from which `client_start` generates and `accumulate` takes the
vector-Jacobian product, while the steps go to the live hypernetwork. The references are
sequential instead (the next client gets a model from the already-stepped phi); with one client
per round the two coincide. With `server_step=round` the g_i are averaged with the clients'
sample weights and one clipped step is taken per round (FL-bench's server until its 2024
refactor, `update_hn`); the round then holds that gradient sum instead of a snapshot. Per-client
steps take about as many steps as the references; the per-round mean takes one per round and
learns far more slowly at the same `hn_lr`.

Evaluation: client i is tested with h(v_i; phi) as it stands (read-only; `eval_adapt` none).

pFedHN-PC (`personal_head=true`, the authors' `experiments/pfedhn_pc`, FL-bench's
`version=pfedhn_pc`): the hypernetwork generates the body only; the head is a personal classifier
that never leaves the client (it starts as the model's initial head, as FL-bench's personal
parameters do) and trains with the body. Only the body travels and only it drives the step.

Hypernetwork size. The output heads follow the authors (`CNNHyper`) and FL-bench
(`HyperNetwork.params_generator`): one Linear(hidden_dim, numel) per parameter tensor, i.e.
(hidden_dim + 1) x (target parameters). For fedavgcnn on FMNIST (582,026 target parameters; 50
clients, embedding 13) that is 58,816,976 hypernetwork parameters (235 MB in float32); a
round holds about four copies (the weights, the round's snapshot, the momentum buffer, one
client's gradient), about 0.94 GB (measured on CPU: a peak 1.0 GB above the same run with
chunk_size=10000). `chunk_size` = C > 0 builds a chunked hypernetwork instead
(von Oswald et al., "Continual learning with hypernetworks", ICLR 2020; neither reference
offers it): the flattened target is cut into ceil(P / C) chunks, each with a learned chunk
embedding (embed_dim floats), the MLP reads [v_i, chunk embedding] and one shared
Linear(hidden_dim, C) emits each chunk; with C = 10,000 that is 1,044,417 parameters for
fedavgcnn on FMNIST (4.2 MB). The parameter count is in the run's summary (`pfedhn_hn_params`).
Initialization is PyTorch's default for these layers (linear weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings N(0, 1)), drawn from a generator seeded by the
run's seed, so a run is reproducible without touching the global RNG.

Memory kept per client: its embedding (embed_dim floats, server side); with `personal_head`
also its head (client side). A model with BatchNorm layers: their running statistics are not
generated; each client keeps its own (from the initial values), as FL-bench's pFedHN requires
(it refuses global buffers), and they never travel. Communication per sampled client and
round: the generated model (or body) down and the delta of the same tensors up, counted exactly
by the engine.

Hyperparameters (defaults; "authors" is `experiments/pfedhn/trainer.py`, FL-bench is
`src/server/pfedhn.py`):
- `embed_dim` (-1): -1 = int(1 + clients / 4), the authors' automatic size (`--embed-dim -1`;
  FL-bench computes int((1 + clients) / 4)).
- `hidden_dim` (100), `n_hidden` (3): the authors' `--hyper-hid 100` and `--n-hidden 3`
  (FL-bench: `hidden_dim 100`, `hidden_num 3`).
- `hn_lr` (0.01), `hn_momentum` (0.9), `hn_weight_decay` (0.001): the hypernetwork's SGD in the
  authors' code (`--lr 1e-2`, momentum 0.9, `--wd 1e-3`) and FL-bench (`hn_lr`, `hn_momentum`,
  `hn_weight_decay`). The authors also offer Adam; not here.
- `embed_lr` (-1): the embeddings' learning rate; -1 = `hn_lr` (both references: `embed_lr None`).
- `norm_clip` (50): the step's gradient-norm clip (authors and FL-bench); 0 turns it off.
- `server_step` (`client`): see above.
- `inner_steps` (0): 0 = the run's local epochs (FL-bench); K > 0 = K mini-batches of the run's
  optimizer (the authors run 50 with lr 5e-3, momentum 0.9 and weight decay 5e-5, and clip the
  inner gradients at 50, which is not reproduced here).
- `personal_head` (false): pFedHN; true is pFedHN-PC.
- `chunk_size` (0): 0 = one output head per parameter tensor (authors, FL-bench).
- `newcomer_epochs` (1): how a client that never trained (`--holdout-clients`) is served. The
  paper generalizes to novel clients by learning a new client's embedding with the hypernetwork
  frozen; how long it trains and where the embedding starts are not fixed by either reference's
  code, so here: from the members' mean embedding, this many epochs of plain SGD at the
  embeddings' learning rate. 0 tests the model the mean embedding generates.

Search space (`pflbench tune`, beside the run's learning rate): hn_lr in [1e-3, 1e-1], log scale,
a decade either side of the references' 1e-2.

Cost: the clients' work is FedAvg's; the server's is not. Per upload it generates a model and takes
a vector-Jacobian product and an SGD step over the whole hypernetwork (58.8 million parameters for
fedavgcnn on FMNIST, about 100 times the target model), and each round copies it once for the
snapshot: measured (`benchmarks/bench_algorithms.py`, 2026-11-26, one thread of this project's 2-core CPU, other core idle) 3.0x FedAvg's time per round with 20 clients, all of it server work
that the references do too. `chunk_size=10000` shrinks the hypernetwork, and that work, 56-fold.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, set_state, subset
from pflbench.core.training import TrainStats, stream_seed

EMBEDDINGS = "embeddings"  # the clients' embeddings (the `embed_lr` group)


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def seeded_linear(in_features: int, out_features: int, gen: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default initialization bounds, drawn from `gen` (the global RNG
    is neither used nor advanced)."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.copy_(_uniform((out_features, in_features), bound, gen))
        layer.bias.copy_(_uniform((out_features,), bound, gen))
    return layer


class HyperNetwork(nn.Module):
    """h(v_i; phi): client embedding -> MLP features -> every target tensor (per-tensor output
    heads, or one chunk head with learned chunk embeddings when `chunk_size` > 0)."""

    def __init__(self, shapes: dict[str, torch.Size], clients: int, embed_dim: int, hidden_dim: int,
                 n_hidden: int, chunk_size: int, gen: torch.Generator):
        super().__init__()
        self.keys = list(shapes)
        self.shapes = dict(shapes)
        self.numels = [math.prod(shapes[k]) for k in self.keys]
        self.chunk_size = chunk_size
        self.embeddings = nn.Parameter(torch.randn(clients, embed_dim, generator=gen))
        in_dim = embed_dim
        if chunk_size:
            self.chunks = math.ceil(sum(self.numels) / chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(self.chunks, embed_dim, generator=gen))
            in_dim = 2 * embed_dim
        dims = [in_dim] + [hidden_dim] * (n_hidden + 1)
        self.mlp = nn.ModuleList(seeded_linear(a, b, gen) for a, b in zip(dims, dims[1:]))
        if chunk_size:
            self.heads = nn.ModuleList([seeded_linear(hidden_dim, chunk_size, gen)])
        else:
            self.heads = nn.ModuleList(seeded_linear(hidden_dim, n, gen) for n in self.numels)

    def features(self, cid: int) -> torch.Tensor:
        """The MLP's output for client `cid` (one row per chunk when chunked)."""
        return self.features_of(self.embeddings[cid])

    def features_of(self, v: torch.Tensor) -> torch.Tensor:
        """The MLP's output for an embedding `v` (a newcomer's, which is not a row of the table)."""
        h = torch.cat([v.expand(self.chunks, -1), self.chunk_embeddings], 1) if self.chunk_size else v
        for i, layer in enumerate(self.mlp):
            h = layer(F.relu(h) if i else h)
        return h

    def forward(self, cid: int) -> dict[str, torch.Tensor]:
        return self.generate_from(self.features(cid))

    def generate_from(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every target tensor from the MLP's output `h`."""
        if self.chunk_size:
            flat = self.heads[0](h).reshape(-1)[:sum(self.numels)]
            parts = flat.split(self.numels)
        else:
            parts = [head(h) for head in self.heads]
        return {k: p.reshape(self.shapes[k]) for k, p in zip(self.keys, parts)}


@register_algorithm("pfedhn")
class PFedHN(Algorithm):
    description = "A server-side hypernetwork generates each client's model from a learned client embedding."
    citation = "Shamsian et al., ICML 2021"
    newcomer = "the model generated from an embedding it learns with the hypernetwork frozen"
    eval_adapt = "none (the model the hypernetwork generates from the client's embedding)"

    @dataclass
    class Hyperparams:
        embed_dim: int = -1
        hidden_dim: int = 100
        n_hidden: int = 3
        hn_lr: float = tunable(0.01, Real(1e-3, 1e-1, log=True))
        embed_lr: float = -1.0
        hn_momentum: float = 0.9
        hn_weight_decay: float = 0.001
        norm_clip: float = 50.0
        server_step: Literal["client", "round"] = "client"
        inner_steps: int = 0
        personal_head: bool = False
        chunk_size: int = 0
        newcomer_epochs: int = 1

        def __post_init__(self):
            if self.embed_dim < 1 and self.embed_dim != -1:
                raise ValueError(f"embed_dim must be >= 1 (or -1 for 1 + clients/4) (got {self.embed_dim})")
            if self.hidden_dim < 1:
                raise ValueError(f"hidden_dim must be >= 1 (got {self.hidden_dim})")
            if self.n_hidden < 0:
                raise ValueError(f"n_hidden must be >= 0 (got {self.n_hidden})")
            if not self.hn_lr >= 0:
                raise ValueError(f"hn_lr must be >= 0 (got {self.hn_lr})")
            if not (self.embed_lr >= 0 or self.embed_lr == -1):
                raise ValueError(f"embed_lr must be >= 0 (or -1 for hn_lr) (got {self.embed_lr})")
            if not 0.0 <= self.hn_momentum < 1.0:
                raise ValueError(f"hn_momentum must be in [0, 1) (got {self.hn_momentum})")
            if not self.hn_weight_decay >= 0:
                raise ValueError(f"hn_weight_decay must be >= 0 (got {self.hn_weight_decay})")
            if not self.norm_clip >= 0:
                raise ValueError(f"norm_clip must be >= 0 (0 = no clipping) (got {self.norm_clip})")
            if self.server_step not in ("client", "round"):
                raise ValueError(f"server_step must be 'client' or 'round' (got {self.server_step!r})")
            if self.inner_steps < 0:
                raise ValueError(f"inner_steps must be >= 0 (0 = local epochs) (got {self.inner_steps})")
            if self.chunk_size < 0:
                raise ValueError(f"chunk_size must be >= 0 (0 = one head per tensor) (got {self.chunk_size})")
            if self.newcomer_epochs < 0:
                raise ValueError(f"newcomer_epochs must be >= 0 (got {self.newcomer_epochs})")

    @classmethod
    def describe_client_state(cls, hp: Any) -> str:
        size = "1 + clients/4" if getattr(hp, "embed_dim", -1) == -1 else str(hp.embed_dim)
        text = f"an embedding of {size} floats (server side)"
        if getattr(hp, "personal_head", False):
            text += " and its classifier head (client side)"
        return text

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        # the hypernetwork generates parameters (pFedHN-PC: the body's); what else the state holds
        # (pFedHN-PC's head, a model's normalization statistics) stays with its client
        params = dict(ctx.model.named_parameters())
        generated = self.body_keys if hp.personal_head else self.all_keys
        self.generated_keys: tuple[str, ...] = tuple(k for k in generated if k in params)
        self.personal_keys = tuple(k for k in self.all_keys if k not in self.generated_keys)
        self.shared_keys = self.generated_keys
        clients = len(ctx.clients)
        embed_dim = hp.embed_dim if hp.embed_dim > 0 else int(1 + clients / 4)
        shapes = {k: params[k].shape for k in self.generated_keys}
        gen = torch.Generator().manual_seed(stream_seed(ctx.config.seed, "pfedhn-hypernetwork"))
        self.hn = HyperNetwork(shapes, clients, embed_dim, hp.hidden_dim, hp.n_hidden, hp.chunk_size,
                               gen).to(ctx.device)
        embed_lr = hp.hn_lr if hp.embed_lr == -1 else hp.embed_lr
        self.optimizer = torch.optim.SGD(
            [{"params": [p for n, p in self.hn.named_parameters() if n != EMBEDDINGS]},
             {"params": [self.hn.embeddings], "lr": embed_lr}],
            lr=hp.hn_lr, momentum=hp.hn_momentum, weight_decay=hp.hn_weight_decay)
        self.initial_local: State = get_state(ctx.model, self.personal_keys)  # what a new client holds
        self.snapshot: dict[str, torch.Tensor] | None = None  # phi at the round's start
        self.received: tuple[int, State] | None = None  # what the training client was sent

    # -- generation ------------------------------------------------------------------------------
    def generate(self, cid: int, params: dict[str, torch.Tensor] | None = None) -> State:
        """theta_cid = h(v_cid) with the live hypernetwork (or `params` in its place), in float32
        whatever the autocast context; no graph."""
        with torch.no_grad(), torch.autocast(self.ctx.device.type, enabled=False):
            out = self.hn(cid) if params is None else functional_call(self.hn, params, (cid,))
        return {k: t.detach() for k, t in out.items()}

    def hypergradient(self, cid: int, delta: State, params: dict[str, torch.Tensor] | None = None
                      ) -> list[torch.Tensor]:
        """(d theta_cid / d phi)^T (-delta) for every hypernetwork parameter (named-parameter
        order), at the live hypernetwork or at `params`."""
        names = [n for n, _ in self.hn.named_parameters()]
        if params is None:
            leaves = [p for _, p in self.hn.named_parameters()]
        else:
            leaves = [params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad(), torch.autocast(self.ctx.device.type, enabled=False):
            out = self.hn(cid) if params is None else functional_call(self.hn, dict(zip(names, leaves)), (cid,))
            keys = [k for k in self.generated_keys if k in delta]
            grads = torch.autograd.grad([out[k] for k in keys], leaves,
                                        grad_outputs=[-delta[k] for k in keys], allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]

    def step(self, grads: list[torch.Tensor]) -> None:
        """One clipped SGD step of the hypernetwork with `grads` as its gradient."""
        params = list(self.hn.parameters())
        for p, g in zip(params, grads):
            p.grad = g
        if self.hp.norm_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.hp.norm_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- the hooks -------------------------------------------------------------------------------
    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.generated_keys

    def begin_round(self, round_: int, sampled: list[int]) -> None:
        if self.hp.server_step == "client":
            self.snapshot = {n: p.detach().clone() for n, p in self.hn.named_parameters()}

    def client_start(self, cid: int, global_state: State) -> State:
        theta = self.generate(cid, self.snapshot)
        self.received = (cid, theta)
        return {**global_state, **theta, **self.kept.get(cid, self.initial_local)}

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        if not self.hp.inner_steps:
            return super().local_train(cid, model, round_)
        return self.train_steps(cid, model, round_, self.hp.inner_steps)

    def train_steps(self, cid: int, model: nn.Module, round_: int, steps: int) -> TrainStats:
        """`steps` mini-batches of the run's optimizer (batches of the "train" stream, as many
        epochs of it as needed), the authors' inner loop."""
        trainer = self.ctx.trainer
        per_epoch = math.ceil(self.ctx.clients[cid].n_train / trainer.batch_size)
        model.train()
        opt = trainer.optimizer(model.parameters())
        loss_sum = torch.zeros((), device=self.ctx.device)
        samples = 0
        for take in itertools.islice(trainer.batch_indices(cid, math.ceil(steps / per_epoch), round_), steps):
            x, y = trainer.data.x[take], trainer.data.y[take]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            samples += len(y)
        trainer.count_grads(samples)
        return TrainStats(loss_sum=float(loss_sum), samples=samples)

    def upload(self, cid: int, trained: State) -> State:
        """The delta of the generated tensors; pFedHN-PC keeps the trained head on the client."""
        got, theta = self.received
        assert got == cid, "upload for a client other than the one that trained"
        self.received = None
        if self.personal_keys:
            self.kept[cid] = subset(trained, self.personal_keys)
        return {k: trained[k] - theta[k] for k in self.generated_keys}

    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        acc = super().begin_aggregation(global_state, expected)
        acc.extra["total"] = float(sum(expected.values()))
        if self.hp.server_step == "round":
            acc.extra["grads"] = [torch.zeros_like(p) for p in self.hn.parameters()]
        return acc

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """The hypernetwork step of one upload (`client`), or its share of the round's mean
        gradient (`round`). Nothing is averaged into the global state."""
        if not upload.payload:
            return
        if self.hp.server_step == "client":
            self.step(self.hypergradient(upload.cid, upload.payload, self.snapshot))
            return
        weight = upload.n_train / acc.extra["total"]
        for total, g in zip(acc.extra["grads"], self.hypergradient(upload.cid, upload.payload)):
            total.add_(g, alpha=weight)

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        if self.hp.server_step == "round" and acc.extra["total"] > 0:
            self.step(acc.extra["grads"])
        self.snapshot = None
        return global_state

    def eval_state(self, cid: int, global_state: State) -> State:
        return {**global_state, **self.generate(cid), **self.kept.get(cid, self.initial_local)}

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A client that never trained learns an embedding of its own with the hypernetwork frozen,
        the paper's way to serve novel clients: it starts from the members' mean embedding and
        takes `newcomer_epochs` of plain SGD (learning rate: the embeddings') on its training data
        through the generated model, then is tested with the model its embedding generates. Test-
        time work, counted in `eval_grad_evals`; the hypernetwork and the members' embeddings do
        not change."""
        model, trainer = self.ctx.model, self.ctx.trainer
        members = list(self.ctx.participants)
        local = self.kept.get(cid, self.initial_local)
        set_state(model, {**global_state, **local})
        v = self.hn.embeddings.detach()[members].mean(0).clone().requires_grad_(True)
        opt = torch.optim.SGD([v], lr=self.optimizer.param_groups[1]["lr"])
        model.train()
        frozen = [p for p in self.hn.parameters() if p.requires_grad]
        for p in frozen:  # only v learns: no gradient is computed for the hypernetwork's weights
            p.requires_grad_(False)
        try:
            with torch.autocast(self.ctx.device.type, enabled=False):
                for x, y in trainer.batches(cid, self.hp.newcomer_epochs, 0, purpose="pfedhn-newcomer"):
                    opt.zero_grad(set_to_none=True)
                    theta = self.hn.generate_from(self.hn.features_of(v))
                    F.cross_entropy(functional_call(model, theta, (x,)), y).backward()
                    opt.step()
                    trainer.count_grads(len(y))
                with torch.no_grad():
                    theta = self.hn.generate_from(self.hn.features_of(v))
        finally:
            for p in frozen:
                p.requires_grad_(True)
        set_state(model, {**global_state, **theta, **local})
        return model

    def summary(self) -> dict[str, Any]:
        return {"pfedhn_hn_params": sum(p.numel() for p in self.hn.parameters())}

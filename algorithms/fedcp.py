"""FedCP: Zhang, Hua, Wang, Song, Xue, Ma and Guan, "FedCP: Separating Feature Information for
Personalized Federated Learning via Conditional Policy", KDD 2023 (arXiv:2307.01217). The authors'
code is github.com/TsingZ0/FedCP (`system/flcore/clients/clientcp.py`, `servers/servercp.py`);
PFLlib (github.com/TsingZ0/PFLlib, `system/flcore/clients/clientcp.py`, `servers/servercp.py`)
carries the same code. FL-bench has no FedCP.

Model. The body (feature extractor) is kept; the linear head is replaced by three modules:
- a personal head h_i (the model's own head; it never leaves the client),
- a global head g (a copy of the same initial head; frozen during local training),
- a conditional policy network (CPN): Linear(D, 2D), LayerNorm(2D), ReLU, D the feature size
  (`ConditionalSelection(in_dim, in_dim)` in both references).
For a sample with feature z = body(x), the CPN reads z * v_i, where v_i is the client's
conditioning vector: the column sums of its personal head's weight (the sum of its class rows),
L2-normalized and held fixed during a round. Its 2D outputs, seen as a 2 x D array, go through a
Gumbel-softmax over the pair (temperature `tau`), which gives the policy (r, s) with r + s = 1 in
every coordinate; the prediction is h_i(z * r) + g(z * s): the personalized part of the feature
goes to the personal head, the global part to the global head.

Local schedule (per sampled client, `local_epochs` of the run's SGD, fresh optimizer, batches from
"train"): body, personal head and CPN are trained (the global head is frozen: its parameters have
`requires_grad=False`) on
    CE(h_i(z * r) + g(z * s), y) + lam * MMD^2(z, z_g),
z_g the features of the same batch under a frozen copy of the body the client received this
round (a forward pass only: no gradient, not counted as sample-gradients). MMD^2 is the biased
estimate with a sum of four Gaussian kernels exp(-||a - b||^2 / (2 w)), w in {10, 15, 20, 50},
as the references' `MMD(..., 'rbf')`; it is computed in float32 even under bf16 autocast.

Upload: the body, the CPN and, in place of the global head, `head_mix` * h_i + (1 - head_mix) * g
(the references' `generate_upload_head`, 0.5 and 0.5); the personal head is kept. The server takes
the sample-weighted mean of the body, the CPN and the uploaded heads (the references' weights:
training samples; the engine's default streamed mean), so the next global head is
head_mix * mean(h_i) + (1 - head_mix) * g. Download: the body, the global head and
the CPN. Evaluation (read-only, no training): the current global body, global head and CPN with the
client's personal head and its v_i, the policy without Gumbel noise (see `noise`); a client
never sampled uses the initial personal head.

Kept per client: its personal head, C * (D + 1) floats (v_i is recomputed from it); for fedavgcnn
on FMNIST, 5,130 floats = 20,520 bytes. The server keeps the global state; a round holds one
scratch copy of the body (the MMD reference). Communication per sampled client and round, each
way: body + one head + CPN (2D^2 + 6D floats); for fedavgcnn on FMNIST 1,109,386 floats =
4,437,544 bytes (FedAvg: 2,328,104). Nothing travels outside that exchange.

Cost: one sample-gradient per sample per batch, as FedAvg; each step also runs the CPN (2D^2 + 6D
weights: for fedavgcnn as many as the body's 512-unit layer) and, with lam > 0, a forward pass of
the reference body and a 2B x 2B kernel matrix (B the batch size), none of which is a sample-
gradient, so they show as time per sample-gradient.

Hyperparameters:
    lam = 5.0      weight of the MMD term: the authors' run script (`system/run_me.sh`, `-lam 5`,
                   MNIST, 4-layer CNN; PFLlib's `-lam` default, 1.0, is the generic one of its
                   `main.py`, shared by every method with a lambda). Search space: [0.5, 50], log
                   scale (a decade either side of the authors' value; neither reference has a
                   grid).
    tau = 1.0      Gumbel-softmax temperature: `F.gumbel_softmax(..., tau=1)` in both references.
    head_mix = 0.5 weight of the personal head in the uploaded global head (both references'
                   `generate_upload_head`); 1 uploads the personal head alone, 0 keeps the global
                   head at its initial value (to rounding).
    noise = "train"  where Gumbel noise is drawn: "train" (default) in local training only, the
                   evaluation policy being the plain softmax, so a client's test accuracy does not
                   depend on a random draw; "always" also at evaluation, as both references do
                   (`gumbel_softmax` in `test_metrics` too), from a stream seeded by (seed, client);
                   "never" nowhere (a deterministic soft policy in training too).

Where we differ from the references, deliberately: every sampled client receives the current
global body, head and CPN at the start of its round (the references send the head and CPN back
only to the clients that just trained, so with a join ratio below 1 a client starts from the head
and CPN of its own last round; the authors ran every client every round, where the two agree);
v_i before a client's first round comes from its initial personal head (the references start
from a U[0, 1)^D vector); Gumbel noise comes from streams seeded by (seed, round, client), drawn
on the CPU one epoch at a time, so CPU and GPU runs see the same noise.

Models: the head must be one linear layer (fedavgcnn, lenet5, mlp); D is read from it.

Cost: each batch also runs the CPN (a D-wide conditional policy network), the Gumbel draw, two
heads, a forward pass of the frozen received body and the MMD between the two feature sets:
measured (`benchmarks/bench_algorithms.py`, 2026-11-26, one thread of this project's 2-core CPU, other core idle) 1.7x
to 1.85x FedAvg's time per sample-gradient on fedavgcnn, all of it the method's own modules (the
references compute the same per batch).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, get_state, set_state, subset
from pflbench.core.training import TrainStats, stream_seed
from pflbench.errors import UserError

RBF_WIDTHS = (10.0, 15.0, 20.0, 50.0)  # the references' `MMD(..., kernel='rbf')` bandwidths

NoiseFn = Callable[[int], torch.Tensor]


def mmd_rbf(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 estimate between the rows of x and y (same count) with the sum of Gaussian
    kernels exp(-d^2 / (2 w)), w in RBF_WIDTHS: mean K(x, x') + mean K(y, y') - 2 mean K(x, y),
    every mean over all pairs, diagonal included (the references' estimate); float32 whatever the
    autocast context. One kernel matrix over the stacked rows (x's and y's blocks computed alike,
    so MMD^2(x, x) is 0 to rounding, and exactly 0 on the CPU)."""
    n = x.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = torch.cat([x.float(), y.float()])
        sq = z.square().sum(1)
        dist = sq[:, None] + sq[None, :] - 2.0 * (z @ z.t())
        kernel = sum(torch.exp(dist * (-0.5 / w)) for w in RBF_WIDTHS)
        return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()


def conditioning_vector(weight: torch.Tensor) -> torch.Tensor:
    """v_i: the column sums of a personal head's weight (C x D), L2-normalized (length D)."""
    return F.normalize(weight.detach().sum(0), dim=0)


class EpochNoise:
    """Gumbel noise for the policy's (B, 2, D) logits, one epoch's block at a time: a block of
    `rows` (the client's training samples) is drawn on the CPU from `gen` and moved to `device`
    once, and consecutive batches take consecutive rows (an epoch's batches hold exactly `rows`
    samples, so a block is exactly one epoch)."""

    def __init__(self, gen: torch.Generator, rows: int, dim: int, device: torch.device):
        self.gen, self.rows, self.dim, self.device = gen, rows, dim, device
        self.block: torch.Tensor | None = None
        self.pos = 0

    def __call__(self, batch: int) -> torch.Tensor:
        if self.block is None or self.pos + batch > self.block.shape[0]:
            e = torch.empty(max(self.rows, batch), 2, self.dim).exponential_(generator=self.gen)
            self.block, self.pos = (-e.log()).to(self.device), 0
        out = self.block[self.pos:self.pos + batch]
        self.pos += batch
        return out


class ConditionalPolicyHead(nn.Module):
    """h_i(z * r) + g(z * s) with (r, s) the CPN's policy for z * v_i (see the module docstring).

    `context` (v_i) and `noise` (a source of Gumbel noise, or None for the plain softmax) are plain
    attributes, not buffers: they are per-client settings, not state that travels."""

    def __init__(self, head: nn.Linear, tau: float):
        super().__init__()
        dim = head.in_features
        self.personal_head = head
        self.global_head = copy.deepcopy(head).requires_grad_(False)
        self.cpn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU())
        self.tau = tau
        self.dim = dim
        self.context: torch.Tensor | None = None
        self.noise: NoiseFn | None = None

    def set_context(self) -> None:
        self.context = conditioning_vector(self.personal_head.weight)

    def policy(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, s): the personalized and global shares of every feature coordinate (r + s = 1)."""
        context = self.context if self.context is not None else conditioning_vector(self.personal_head.weight)
        logits = self.cpn(z * context).view(z.shape[0], 2, self.dim)
        if self.noise is not None:
            logits = logits + self.noise(z.shape[0])
        shares = torch.softmax(logits / self.tau, dim=1)
        return shares[:, 0], shares[:, 1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        r, s = self.policy(z)
        return self.personal_head(z * r) + self.global_head(z * s)


@register_algorithm("fedcp")
class FedCP(Algorithm):
    description = ("A conditional policy splits each feature between a personal head and a frozen "
                   "global head; MMD keeps local features near the global body's.")
    citation = "Zhang et al., KDD 2023"
    client_state = "a personal head (its conditioning vector is derived from it)"
    eval_adapt = ("the client's personal head plus the global head on the policy's split of the "
                  "global body's features (Gumbel noise: {noise}; no training)")

    @dataclass
    class Hyperparams:
        lam: float = tunable(5.0, Real(0.5, 50.0, log=True))
        tau: float = 1.0
        head_mix: float = 0.5
        noise: Literal["train", "always", "never"] = "train"

        def __post_init__(self):
            if not (self.lam >= 0 and math.isfinite(self.lam)):
                raise ValueError(f"lam must be a finite number >= 0 (got {self.lam})")
            if not (self.tau > 0 and math.isfinite(self.tau)):
                raise ValueError(f"tau must be a finite number > 0 (got {self.tau})")
            if not 0.0 <= self.head_mix <= 1.0:
                raise ValueError(f"head_mix must be in [0, 1] (got {self.head_mix})")
            if self.noise not in ("train", "always", "never"):
                raise ValueError(f"noise must be train, always or never (got {self.noise})")

    def __init__(self, ctx, hp):
        head = ctx.model.head
        if not isinstance(head, nn.Linear):
            raise UserError("fedcp needs a model whose head is one linear layer")
        with torch.random.fork_rng(devices=[]):  # the CPN's init from its own stream
            torch.manual_seed(stream_seed(ctx.config.seed, "fedcp-init"))
            new_head = ConditionalPolicyHead(head, hp.tau)
        ctx.model.head = new_head.to(head.weight.device)
        super().__init__(ctx, hp)
        names = [n for n, _ in head.named_parameters()]  # weight, bias: the two heads' tensors, paired
        self.personal_head_keys = tuple(f"head.personal_head.{n}" for n in names)
        self.global_head_keys = tuple(f"head.global_head.{n}" for n in names)
        self.personal_keys = self.personal_head_keys
        self.shared_keys = tuple(k for k in self.all_keys if k not in self.personal_keys)
        self.reference_body = copy.deepcopy(ctx.model.body).requires_grad_(False)

    # -- the round ------------------------------------------------------------------------------
    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        head: ConditionalPolicyHead = model.head
        head.set_context()
        lam = self.hp.lam
        reference = self.reference_body
        if lam > 0:
            set_state(reference, get_state(model.body))  # the body received this round
            reference.train()  # train mode, as the references' frozen copy (matters only with BatchNorm)
        if self.hp.noise == "never":
            head.noise = None
        else:
            gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, round_, cid, "fedcp-gumbel"))
            head.noise = EpochNoise(gen, self.ctx.clients[cid].n_train, head.dim, self.ctx.device)

        def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            z = net.body(x)
            loss = F.cross_entropy(net.head(z), y)
            if lam > 0:
                with torch.no_grad():
                    z_ref = reference(x)
                loss = loss + lam * mmd_rbf(z, z_ref)
            return loss

        try:
            params = [p for p in model.parameters() if p.requires_grad]  # not the global head
            return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                                        params=params, loss_fn=loss_fn)
        finally:
            head.noise = None

    def upload(self, cid: int, trained: State) -> State:
        """Keep the personal head; send body, CPN and head_mix * personal + (1 - head_mix) * global."""
        self.kept[cid] = subset(trained, self.personal_keys)
        payload = subset(trained, self.shared_keys)
        mix = self.hp.head_mix
        for g, p in zip(self.global_head_keys, self.personal_head_keys):
            payload[g] = trained[p] * mix + trained[g] * (1.0 - mix)
        return payload

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        model = self.ctx.model
        set_state(model, self.eval_state(cid, global_state))
        head: ConditionalPolicyHead = model.head
        head.set_context()
        head.noise = None
        if self.hp.noise == "always":
            gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, "fedcp-eval", cid))
            head.noise = lambda batch: (-torch.empty(batch, 2, head.dim).exponential_(generator=gen).log()
                                        ).to(self.ctx.device)
        return model

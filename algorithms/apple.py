"""APPLE: Luo and Wu, "Adapt to Adaptation: Learning Personalization for Cross-Silo Federated
Learning", IJCAI 2022 (arXiv:2110.08394). References: the authors' code,
github.com/ljaiverson/pFL-APPLE (`train_APPLE.py`, `utils/apple.py`, `utils/losses.py`,
`utils/models.py`, `utils/utils.py`), and PFLlib (github.com/TsingZ0/PFLlib,
`system/flcore/clients/clientapple.py`, `servers/serverapple.py`).

Every client i owns a core model theta_i (the only thing it uploads) and a directed-relationship
(DR) vector p_i = (p_i1, ..., p_iN) over all N clients (never sent). Its personalized model is

    w_i = sum_j p_ij theta_j

built from its own core model and the downloaded core models of the others. No global model is
averaged: the server is a store of the N core models.

Schedule per round, for each sampled client i:
1. down: the server sends the N core models as they were at the start of the round (counted with
   `Context.count_traffic` in `client_start`, N models per sampled client: PFLlib hands every
   client the list of all N core models, and the authors' code downloads all of them when the
   bandwidth is not limited, its default; `download=others` counts N - 1, the client's own core
   model staying on the client).
2. local training (`local_epochs` over the "train" batches, the ones Local uses; one optimizer for
   theta_i and p_i, as in the authors' code): each step rebuilds w_i from the current theta_i and
   p_i (theta_j, j != i, fixed) and minimizes CE(w_i) + lambda(r) * mu * ||p_i - p0||^2 (the
   authors' `reg_loss`: no factor 1/2). Autograd gives the exact gradients, as the authors' code
   does (their `ClientNet` forwards through sum_j p_j layer_j): d/dtheta_i = p_ii * g and
   d/dp_ij = <g, theta_j> + 2 lambda(r) mu (p_ij - p0_j), g being the gradient of CE at w_i.
   theta_i uses the run's optimizer settings (lr, momentum, weight decay); p_i the run's momentum,
   learning rate `dr_lr` and no weight decay (the authors' code: SGD with momentum 0.9 on both,
   no weight decay). p is not projected on the simplex (neither reference does). The core model's
   step is p_ii times the run's lr (about lr / N at the start; see `scale_lr`). The reported
   training loss is that objective.
3. up: theta_i (the whole model) goes to the server, which stores it as client i's core model at
   the end of the round (uploads are held until then, so every client of a round reads the same
   round-start core models whatever the order in which clients train; both references also swap
   in the new core models only after the round).

p0 = (n_1/n, ..., n_N/n), the clients' shares of the training samples (both references); lambda(r),
r = round - 1 (0-based, as in both references), L_r = int(L * rounds) (both references give L as
a fraction of the run's rounds):
    cos:    (cos(pi r / L_r) + 1) / 2  for r < L_r, else 0   (PFLlib; the authors' `cosine`)
    exp:    0.001 ** (r / L_r)        for r < L_r, else 0   (the authors' `exponential`)
    linear: 1 - r / L_r               for r < L_r, else 0   (in neither reference's code: an
                                                             extra shape for comparisons)
so early rounds pull p_i towards the FedAvg weights (the global objective) and later rounds leave
it free (the local objective). mu = 0 turns the regularizer off.

Evaluation: client i is tested with w_i = sum_j p_ij theta_j over the current core models (read
only: nothing is trained or kept). A client that has not trained yet keeps its initial p_i.
Holdout clients (`--holdout-clients`) are outside the federation: their cores get weight 0 in
every p_i and are never downloaded, and as newcomers they are tested with p0's combination of the
members' cores (the combination every member starts from: APPLE defines no rule for new clients).
N counts the members, in p0 and in the learning-rate scaling. Like the
other algorithms' evaluation with the current global model, fetching the cores for evaluation is
not counted as traffic.

State and BatchNorm statistics: every state tensor, parameters and normalization statistics, is
part of a core model, and the evaluation combines all of them. During training only parameters
are combined; a BatchNorm layer trains on batch statistics and updates the running statistics of
the client's own core model, which it uploads.

Memory per client: its core model (server side: the other clients read it) and p_i (N floats,
client side); the server holds the N core models as the rows of one N x model matrix plus, within
a round, the uploads of the round's sampled clients until the round ends. fedavgcnn on FMNIST has 582,026
parameters: 2,328,104 bytes per core model, plus 4N bytes of p_i. Communication per sampled
client and round: one model up, N models down (N - 1 with `download=others`). Compute: one
forward and backward pass per sample, as FedAvg, plus two products of the N x model matrix with a
vector per step (sum_j p_ij theta_j forward, <g, theta_j> backward; one per round when p is
frozen): not sample-gradients, not counted.

Hyperparameters (defaults from the authors' code, `utils/utils.py`, unless said):
    dr_lr = 0.001    learning rate of p_i: the authors' `--lr_coef` default (their README's example
                     uses it too). PFLlib's `-dlr` defaults to 0 (p frozen) and its p gradient is a
                     mean over elements and tensors, so its values are not on this scale.
    mu = 0.1         weight of the regularizer: the authors' `--mu` default (PFLlib's `-mu` is a
                     flag shared with other algorithms, default 0).
    L = 0.1          fraction of the run's rounds over which lambda decays to 0: the authors'
                     `--reg_last_round_over_total_round` default. PFLlib's `-L` defaults to 1.0.
    schedule = cos   lambda's shape: PFLlib's only one, and one of the authors' two; the authors'
                     command-line default is `exp`.
    init = samples   initial p_i: every client starts from p0 (p_ij = n_j / n, so p_ii = n_i / n;
                     the authors' `init_pss`). `uniform` (p_ij = 1/N) is PFLlib's.
    download = all   core models each sampled client downloads per round: all N (PFLlib's
                     `send_models`, the authors' unlimited-bandwidth default), or `others` (N - 1).
    scale_lr = False theta_i's learning rate is the run's (the authors' code); True multiplies it by
                     N, as PFLlib does (the core gradient is scaled by p_ii, about 1/N).

Where the references differ and this file does not follow both: the authors' code gives every
client's core model its own random initialization; here they all start from the run's initial
model (PFLlib: one `args.model` copied), so w_i is that model (to rounding) at the first round. PFLlib trains
every client every round whatever the join ratio, updates p with a hand-written mean-normalized
gradient (the mean over tensors of the mean over elements of g * theta_j, plus lambda mu (p - p0):
half this file's regularizer gradient), computes lambda at the end of a round for the next (one
round late), and uploads its personalized model of the last batch as the new core model; the
authors' code and this file upload the trained core model. The authors' bandwidth-limited
download (`--limit_downloaded_models`, M models drawn by |p|) is not implemented (their default is
unlimited).

Boundary: with every p_i set to the one-hot e_i and frozen (dr_lr = 0; mu = 0, so the reported
loss carries no constant term) each client trains and is tested with its own core model alone:
exactly Local, bit for bit (tested; and with `scale_lr`, Local at N times the lr).

Cost: every local step combines the N core models (p_i times an N x P matrix, and its gradient
with respect to p_i) before the forward pass, so a step costs a model-sized matrix-vector
product per client more than FedAvg's: measured (`benchmarks/bench_algorithms.py`, 2026-11-26, one thread of this project's 2-core CPU, other core idle) 1.6x FedAvg's time per
sample-gradient with 20 clients, growing with N. Both references combine the same way.

Search space (`pflbench tune`, beside the run's learning rate): dr_lr in [1e-4, 1e-2] and mu in
[0.01, 1], log scale: a decade either side of the authors' defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import RunningMean, State, get_state, nbytes, set_state
from pflbench.core.training import TrainStats

SCHEDULES = ("cos", "exp", "linear")
EXP_FLOOR = 0.001  # the authors' exponential scheduler decays to this share of mu at round L


@register_algorithm("apple")
class APPLE(Algorithm):
    description = ("Each client learns a vector p_i over all clients' core models and trains its own core "
                   "through the personalized model sum_j p_ij theta_j.")
    citation = "Luo and Wu, IJCAI 2022"
    client_state = ("its core model (server side, read by every client) and its DR vector p_i "
                    "(one float per client, client side)")
    newcomer = "the p0 combination of the members' core models"
    eval_adapt = "none (tested with sum_j p_ij theta_j over the current core models, no training)"

    @dataclass
    class Hyperparams:
        dr_lr: float = tunable(0.001, Real(1e-4, 1e-2, log=True))
        mu: float = tunable(0.1, Real(0.01, 1.0, log=True))
        L: float = 0.1
        schedule: Literal["cos", "exp", "linear"] = "cos"
        init: Literal["samples", "uniform"] = "samples"
        download: Literal["all", "others"] = "all"
        scale_lr: bool = False

        def __post_init__(self):
            if not (math.isfinite(self.dr_lr) and self.dr_lr >= 0):
                raise ValueError(f"dr_lr must be a finite number >= 0 (got {self.dr_lr})")
            if not (math.isfinite(self.mu) and self.mu >= 0):
                raise ValueError(f"mu must be a finite number >= 0 (got {self.mu})")
            if not 0.0 <= self.L <= 1.0:
                raise ValueError(f"L must be in [0, 1], a fraction of the run's rounds (got {self.L})")
            if self.schedule not in SCHEDULES:
                raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
            if self.init not in ("samples", "uniform"):
                raise ValueError(f"init must be 'samples' or 'uniform' (got {self.init!r})")
            if self.download not in ("all", "others"):
                raise ValueError(f"download must be 'all' or 'others' (got {self.download!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        n = len(ctx.clients)
        self.num_clients = n
        initial = get_state(ctx.model)
        self.core_bytes = nbytes(initial)
        # the N core models as the rows of one matrix: the parameters first (in the model's order),
        # then the other state tensors (normalization statistics), each flattened
        self.keys: tuple[str, ...] = self.param_keys + tuple(k for k in initial if k not in self.param_keys)
        self.shapes = [initial[k].shape for k in self.keys]
        self.sizes = [initial[k].numel() for k in self.keys]
        self.n_params = sum(initial[k].numel() for k in self.param_keys)
        self.cores = self.flatten(initial).unsqueeze(0).repeat(n, 1)
        # the federation is the clients that train: a holdout client's core (never trained) gets
        # weight 0 in every p_i, and the mask below keeps it out of every combination
        self.members = torch.zeros(n, device=ctx.device)
        self.members[list(ctx.participants)] = 1.0
        counts = torch.tensor([c.n_train for c in ctx.clients], dtype=torch.float64) * self.members.double().cpu()
        self.p0 = (counts / counts.sum()).to(torch.float32).to(ctx.device)
        start = self.p0 if hp.init == "samples" else self.members / self.members.sum()
        self.p = start.unsqueeze(0).repeat(n, 1)  # row i: client i's DR vector p_i

    def flatten(self, state: State) -> torch.Tensor:
        return torch.cat([state[k].reshape(-1) for k in self.keys])

    def unflatten(self, flat: torch.Tensor, params_only: bool = False) -> State:
        """Named views of a flat vector laid out as a row of `cores` (or its parameter part)."""
        count = len(self.param_keys) if params_only else len(self.keys)
        parts = flat.split(self.sizes[:count])
        return {k: v.view(shape) for k, v, shape in zip(self.keys[:count], parts, self.shapes[:count])}

    # -- the schedule of the regularizer ---------------------------------------------------------
    def reg_coef(self, round_: int) -> float:
        """lambda(r) * mu for the 1-based `round_` (r = round_ - 1, as the references count)."""
        last = int(self.hp.L * self.ctx.config.rounds)
        r = round_ - 1
        if self.hp.mu == 0 or r >= last:
            return 0.0
        if self.hp.schedule == "cos":
            shape = (math.cos(math.pi * r / last) + 1.0) / 2.0
        elif self.hp.schedule == "exp":
            shape = EXP_FLOOR ** (r / last)
        else:
            shape = 1.0 - r / last
        return shape * self.hp.mu

    # -- what travels ----------------------------------------------------------------------------
    def download_keys(self, cid: int) -> tuple[str, ...]:
        return ()  # the core models are counted in `client_start`: there is no global model

    def models_downloaded(self) -> int:
        members = len(self.ctx.participants)
        return members if self.hp.download == "all" else members - 1

    def client_start(self, cid: int, global_state: State) -> State:
        """Send the round-start core models (counted) and start from the client's own."""
        self.ctx.count_traffic(down=self.models_downloaded() * self.core_bytes)
        return self.unflatten(self.cores[cid])

    # -- local training --------------------------------------------------------------------------
    def others_sum(self, cid: int, p: torch.Tensor) -> torch.Tensor:
        """sum_{j != i} p_ij theta_j over the parameters, flat (differentiable in p)."""
        mask = self.members.clone()
        mask[cid] = 0.0
        with torch.autocast(self.ctx.device.type, enabled=False):
            return (p * mask) @ self.cores[:, :self.n_params]

    def combine(self, cid: int, p: torch.Tensor, own: list[torch.Tensor],
                others: torch.Tensor | None = None) -> State:
        """The personalized parameters p_ii * theta_i + sum_{j != i} p_ij theta_j, theta_i being the
        tensors `own` (trainable, in the model's order) and theta_j the stored core models; `others`
        is the second sum when it is known to be constant. In float32 whatever the autocast."""
        with torch.autocast(self.ctx.device.type, enabled=False):
            if others is None:
                others = self.others_sum(cid, p)
            flat = p[cid] * torch.cat([t.reshape(-1) for t in own]) + others
            return self.unflatten(flat, params_only=True)

    def apple_loss(self, cid: int, p: torch.Tensor, round_: int
                   ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The local objective CE(sum_j p_ij theta_j) + lambda(r) mu ||p_i - p0||^2, as a loss
        function of the model holding theta_i (for `Trainer.sgd`)."""
        coef = self.reg_coef(round_)
        fixed = None
        if not p.requires_grad:
            with torch.no_grad():
                fixed = self.others_sum(cid, p)
        p0 = self.p0

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            weights = self.combine(cid, p, list(model.parameters()), fixed)
            loss = F.cross_entropy(functional_call(model, weights, (x,)), y)
            if coef:
                loss = loss + coef * (p - p0).square().sum()
            return loss

        return loss_fn

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        trainer = self.ctx.trainer
        learn_p = self.hp.dr_lr > 0
        p = self.p[cid].clone().requires_grad_(learn_p)
        lr = trainer.lr * (len(self.ctx.participants) if self.hp.scale_lr else 1)
        groups = [{"params": list(model.parameters()), "lr": lr}]
        if learn_p:
            groups.append({"params": [p], "lr": self.hp.dr_lr, "weight_decay": 0.0})
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=trainer.momentum, weight_decay=trainer.weight_decay)
        stats = trainer.sgd(model, cid, self.ctx.config.local_epochs, round_, optimizer=optimizer,
                            loss_fn=self.apple_loss(cid, p, round_))
        self.p[cid] = p.detach()  # p_i stays on the client
        return stats

    def upload(self, cid: int, trained: State) -> State:
        return trained  # the core model theta_i

    # -- the server: a store of core models, swapped in at the end of the round ------------------
    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        return Accumulator(RunningMean(), dict(expected))

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        acc.extra[upload.cid] = upload.payload

    @torch.no_grad()
    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        for cid, core in acc.extra.items():
            self.cores[cid] = self.flatten(core)
        return global_state  # no global model: the engine's stays the initial one, unused

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_state(self, cid: int, global_state: State) -> State:
        """sum_j p_ij theta_j over every state tensor of the current core models (read only)."""
        with torch.autocast(self.ctx.device.type, enabled=False):
            return self.unflatten(self.p[cid] @ self.cores)

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A client that never trained has no core model and no p_i of its own: it gets the
        combination every p_i starts from, p0 (sample-weighted over the members), of the cores."""
        with torch.no_grad(), torch.autocast(self.ctx.device.type, enabled=False):
            set_state(self.ctx.model, self.unflatten(self.p0 @ self.cores))
        return self.ctx.model

    def summary(self) -> dict[str, float]:
        """The mean self-weight p_ii and the mean off-diagonal weight, over all clients."""
        n = self.num_clients
        diag = torch.diagonal(self.p)
        off = (self.p.sum() - diag.sum()) / max(1, n * (n - 1))
        return {"apple_p_self_mean": float(diag.mean()), "apple_p_other_mean": float(off)}

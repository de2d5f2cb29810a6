"""Floco: Grinwald, Wiesner and Nakajima, "Federated Learning over Connected Modes", NeurIPS 2024
(arXiv:2403.03333; the authors' code is the Flower baseline `baselines/floco`; FL-bench has a port).

The model's last layer (its linear `head`) becomes a solution simplex: M endpoint weight matrices
W_1..W_M (one shared bias, as in the authors' code), and the layer used is W(alpha) = sum_m alpha_m
W_m for a point alpha of the standard simplex. The body stays one shared network.

Schedule. Every local SGD step of a sampled client draws a fresh alpha and trains the body, the
bias and the endpoints through W(alpha) (`local_epochs` of the run's SGD, batches from "train"):
- before the subregions are assigned, alpha is uniform on the whole simplex (Dirichlet(1));
- after, alpha is uniform on the client's subregion R_c = {alpha in simplex : ||alpha - c||_1 <=
  rho} around its center c (an exact sampler: R_c is cut into pieces by the sign pattern of
  alpha - c, a piece is drawn by volume, a point uniformly in it, and points outside the simplex
  are rejected; every point returned is non-negative, sums to 1 and lies within rho of c).
The server averages body, bias and endpoints (sample-weighted, as FedAvg).

Subregion assignment, once, after round `tau` (so rounds 1..tau train on the whole simplex and
rounds tau + 1.. in the subregions, as in FL-bench, whose projection comes at the start of its
(0-based) round tau), provided a round follows: every client's gradient signal is its
pseudo-gradient on the endpoints in that round (global W - trained W, flattened): the sampled
clients' come from their uploads; every other client trains once from the same global model
(exactly the schedule it would have had if sampled) and sends its trained endpoints, as in the
authors' code (where all clients train in the round before the projection; only the sampled ones
are aggregated). The server reduces the signals to M dimensions by PCA (scores from the
eigendecomposition of the centered signals' Gram matrix; each component's sign fixed so its
largest-magnitude score is positive) and projects each client onto the simplex by Euclidean
projection, after scaling the scores by 1/z, choosing z on a grid of 1000 values in [1e-4, 1] to
minimize the Riesz s-energy (s = 2) of the projected points (spreading the clients over the
simplex), as in the authors' code. Then, only where the exact sampler would be slow (under 0.5% of
its proposals inside the simplex, which happens when several coordinates of a center are
positive but tiny), the smallest positive coordinates of that center are set to 0 one at a time
(renormalizing) until it is fast; such coordinates are tiny, so the center barely moves.

Evaluation: every client is tested at its center W(c) (Floco; before the assignment, at the
simplex's barycenter). Floco+ (local fine-tuning of a personal copy) is not implemented; the
engine's `--finetune-epochs` fine-tunes the model at the center before testing.

Holdout clients (`--holdout-clients`) never train and take no part in the assignment (the PCA is
fitted on the members' signals). As newcomers they are placed from their local data: each computes
its signal from the current global model (one local schedule on the whole simplex, counted as
test-time compute) and the assignment's fitted map (the members' mean and principal axes, the
chosen scale z) projects it onto the simplex, as the paper places a client from its signal.

Communication: down, the body, the M endpoints and the bias; up, the same. The assignment's extra
traffic (for each client not sampled in round `tau`: one download of the model and one upload of
its endpoints) is added to the run's byte totals through `Context.count_traffic`; since it runs
inside `aggregate`, its local training is timed as server work.

With M = 1 the single endpoint is the model's initial head, every alpha is (1), no assignment
happens, and Floco is exactly FedAvg.

With tau >= the run's rounds no round would train in a subregion, so the assignment never happens
(as in FL-bench, where it would come at round tau + 1): the run is still valid, as simplex
training (alpha uniform on the whole simplex every step) evaluated at the barycenter, and its
summary says `floco_assigned = 0`.

Hyperparameters:
    endpoints = 10   M, the simplex's endpoints (paper, authors' code and FL-bench).
    rho = 0.1        the subregions' L1 radius: FL-bench's default (src/server/floco.py), which
                     the FedOBP authors' fork (github.com/uglyghost/FedOBP) keeps for its Floco
                     baseline; also the authors' choice for their fold split.
    tau = 10         rounds before the assignment: FL-bench's default, kept by the FedOBP fork.
                     tau = -1 means half the run's rounds, the other reference: the authors'
                     Flower baseline (github.com/adap/flower, baselines/floco) runs tau = 250 of
                     500 rounds with rho = 0.3 on its Dirichlet split (conf/cifar10_dir_floco.toml;
                     rho = 0.1 on the fold split); pass `tau=-1 rho=0.3` for it. Its tau counts
                     the projection round itself (its subregions start at round tau, here at
                     tau + 1).

Where the implementations differ: the authors' code (and FL-bench) samples center + r * u with
r ~ U(0, rho) and u a random direction scaled to unit L1 norm, which is not uniform and leaves
the simplex (the coordinates no longer sum to 1 and may be negative); we sample the subregion as
the paper defines it. They initialize every endpoint with Xavier-normal under seeds seed + m; here
endpoint 1 is the model's own initial head weight (so M = 1 is FedAvg) and the others are drawn
with the model's default linear init, U(-1/sqrt(D), 1/sqrt(D)), from a generator seeded by the
run's seed. FL-bench collects the signals in an extra full round at round tau (its sampled clients
train twice); we follow the authors' Flower code.

Model: the algorithm replaces the model's linear `head` by a `SimplexHead` (parameters
`head.endpoints` and `head.bias`, the point alpha a buffer) before the engine reads the model's
state, so the endpoints travel and are averaged as ordinary head parameters.

Search space (`pflbench tune`, beside the run's learning rate): rho in [0.05, 0.5], which holds both
references' radii (FL-bench's 0.1, Flower's 0.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.errors import UserError
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State, nbytes, set_state
from pflbench.core.training import TrainStats, stream_seed

ENDPOINTS = "head.endpoints"  # the simplex head's endpoint weights

MAX_BATCHES = 10_000
MIN_ACCEPTANCE = 0.005  # see snap_center


class SimplexHead(nn.Module):
    """A linear layer whose weight is the point `alpha` (a buffer) of the simplex spanned by
    `endpoints` weight matrices: W(alpha) = sum_m alpha_m W_m, one shared bias."""

    def __init__(self, head: nn.Linear, endpoints: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = head.weight.shape
        weights = torch.empty(endpoints, out_features, in_features, dtype=head.weight.dtype)
        weights[0] = head.weight.detach().cpu()
        bound = 1.0 / math.sqrt(in_features)
        for m in range(1, endpoints):
            weights[m] = (torch.rand(out_features, in_features, generator=generator, dtype=torch.float64)
                          * 2 - 1).mul_(bound).to(weights.dtype)
        device = head.weight.device
        self.endpoints = nn.Parameter(weights.to(device))
        bias = head.bias.detach().clone() if head.bias is not None else torch.zeros(out_features)
        self.bias = nn.Parameter(bias.to(device))
        # not state: written from the client's center (or a sampled point) before every use
        self.register_buffer("alpha", torch.full((endpoints,), 1.0 / endpoints, device=device), persistent=False)

    def weight(self) -> torch.Tensor:
        if self.endpoints.shape[0] == 1:
            return self.endpoints[0]
        return torch.einsum("m,mcd->cd", self.alpha, self.endpoints)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight(), self.bias)


# -- the simplex: sampling and projection --------------------------------------------------------
def sample_simplex(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """n points uniform on the standard (m-1)-simplex (float64, CPU)."""
    e = torch.empty(n, m, dtype=torch.float64).exponential_(generator=gen)
    return e / e.sum(1, keepdim=True)


def _proposer(center: torch.Tensor, rho: float):
    """Proposals for the subregion sampler: (points, inside-the-simplex flags) for a batch size.

    For d = a - center (sum 0) with positive part on P and negative part on N, ||d||_1 = 2t with
    t the sum of either part. The piece of sign pattern (P, N), |P| = k, |N| = l = M - k, has
    volume proportional to (rho/2)^(M-1) / ((k-1)! (l-1)!), and within it t has density
    proportional to t^(M-2) and both parts are t times uniform points of simplices. Coordinates
    where the center is 0 can only grow, so patterns putting them in N (whose pieces lie outside
    the simplex) are never drawn; the caller rejects the other points outside the simplex."""
    m = center.numel()
    zero = center <= 0
    support = int((~zero).sum())
    sizes = torch.arange(1, min(support, m - 1) + 1)  # l = |N|
    log_w = torch.tensor([math.lgamma(support + 1) - math.lgamma(l + 1) - math.lgamma(support - l + 1)
                          - math.lgamma(m - l) - math.lgamma(l) for l in sizes.tolist()], dtype=torch.float64)
    probs = torch.softmax(log_w, 0)

    def propose(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        l = sizes[torch.multinomial(probs, batch, replacement=True, generator=gen)]
        keys = torch.rand(batch, m, generator=gen, dtype=torch.float64)
        keys[:, zero] = math.inf  # never negative where the center is 0
        neg = keys <= keys.sort(1).values.gather(1, (l - 1)[:, None])  # l random members of the support
        t = rho / 2 * torch.rand(batch, generator=gen, dtype=torch.float64) ** (1.0 / (m - 1))
        e = torch.empty(batch, m, dtype=torch.float64).exponential_(generator=gen)
        pos_e, neg_e = e * ~neg, e * neg
        d = t[:, None] * (pos_e / pos_e.sum(1, keepdim=True) - neg_e / neg_e.sum(1, keepdim=True))
        a = center + d
        return a, (a >= 0).all(1)

    return propose


def sample_subregion(center: torch.Tensor, rho: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n points uniform on {a in simplex : ||a - center||_1 <= rho} (float64, CPU), by rejection
    from the pieces of the L1 ball around the center (see `_proposer`)."""
    center = center.to(torch.float64).cpu()
    m = center.numel()
    if m == 1 or rho <= 0:
        return center.expand(n, m).clone()
    if rho >= 2:  # the L1 diameter of the simplex is 2: the ball holds all of it
        return sample_simplex(n, m, gen)
    propose = _proposer(center, rho)
    accepted = []
    count, proposed, batch = 0, 0, max(256, 2 * n)
    for _ in range(MAX_BATCHES):
        a, ok = propose(batch, gen)
        accepted.append(a[ok])
        count += int(ok.sum())
        proposed += batch
        if count >= n:
            break
        rate = max(count, 1) / proposed  # size the next batch by the acceptance seen so far
        batch = int(min(max(256, 1.2 * (n - count) / rate), (1 << 22) // m))
    else:
        raise RuntimeError(f"floco: could not sample the subregion of {center.tolist()} (rho={rho})")
    a = torch.cat(accepted)[:n]
    return a / a.sum(1, keepdim=True)


def acceptance(center: torch.Tensor, rho: float, gen: torch.Generator, batch: int = 8192) -> float:
    """The fraction of the sampler's proposals that fall inside the simplex (an estimate)."""
    center = center.to(torch.float64).cpu()
    if center.numel() == 1 or rho <= 0 or rho >= 2:
        return 1.0
    return float(_proposer(center, rho)(batch, gen)[1].double().mean())


def snap_center(center: torch.Tensor, rho: float, gen: torch.Generator) -> torch.Tensor:
    """Zero the smallest positive coordinates of `center` (renormalizing) until the sampler
    accepts at least MIN_ACCEPTANCE of its proposals; a vertex always passes."""
    c = center.to(torch.float64).clone()
    while acceptance(c, rho, gen) < MIN_ACCEPTANCE:
        positive = c > 0
        c[torch.where(positive, c, torch.full_like(c, math.inf)).argmin()] = 0.0
        c = c / c.sum()
    return c


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row (last dimension) of v onto the standard simplex."""
    u = v.sort(-1, descending=True).values
    css = u.cumsum(-1) - 1.0
    ind = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    r = (u - css / ind > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, r - 1) / r
    return (v - theta).clamp_min(0)


def riesz_log_energy(points: torch.Tensor) -> torch.Tensor:
    """log of the mean Riesz 2-energy sum 1/|x_i - x_j|^2 over pairs, per batch of point sets."""
    n = points.shape[-2]
    dist = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist").clamp_min(1e-4)
    iu = torch.triu_indices(n, n, 1)
    pairs = dist[..., iu[0], iu[1]]
    return torch.log((1.0 / pairs.square()).sum(-1)) - math.log(pairs.shape[-1])


@dataclass
class Placement:
    """The map the assignment fitted, kept to place a newcomer the way the clients were placed:
    its signal, centered by the clients' mean, projected on their principal axes (signs as fixed
    for the clients' scores), scaled by 1/z and projected onto the simplex."""

    mean: torch.Tensor  # (D,) the clients' mean signal
    axes: torch.Tensor  # (D, r) unit principal directions
    m: int
    z: float

    def __call__(self, signal: torch.Tensor) -> torch.Tensor:
        kappa = torch.zeros(self.m, dtype=torch.float64)
        kappa[:self.axes.shape[1]] = (signal.to(torch.float64) - self.mean) @ self.axes
        beta = project_simplex(kappa / self.z)
        return beta / beta.sum()


def assign_centers(signals: torch.Tensor, m: int) -> torch.Tensor:
    """PCA of the clients' signals to m dimensions, then the Riesz-energy-optimal simplex projection."""
    return fit_centers(signals, m)[0]


def fit_centers(signals: torch.Tensor, m: int) -> tuple[torch.Tensor, Placement]:
    """`assign_centers`, and the fitted map (:class:`Placement`) that places a new signal."""
    x = signals.to(torch.float64)
    mean = x.mean(0)
    x = x - mean
    eigval, eigvec = torch.linalg.eigh(x @ x.T)  # PCA scores from the clients' Gram matrix
    r = min(m, x.shape[0])
    scores = eigvec.flip(1)[:, :r] * eigval.flip(0)[:r].clamp_min(0).sqrt()
    pick = scores.abs().argmax(0)
    sign = torch.sign(scores[pick, torch.arange(r)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    scores = scores * sign
    # the scores are x @ axes with axes = x^T u_k / sqrt(lambda_k) (0 for a null direction)
    root = eigval.flip(0)[:r].clamp_min(0).sqrt()
    axes = (x.T @ eigvec.flip(1)[:, :r]) / torch.where(root > 0, root, torch.inf) * sign
    kappa = torch.zeros(x.shape[0], m, dtype=torch.float64)
    kappa[:, :r] = scores
    if x.shape[0] < 2:
        return project_simplex(kappa), Placement(mean, axes, m, 1.0)
    zs = torch.linspace(1e-4, 1.0, 1000, dtype=torch.float64)
    best, best_energy, best_z = None, math.inf, 1.0
    for chunk in zs.split(100):
        betas = project_simplex(kappa[None] / chunk[:, None, None])
        betas = betas / betas.sum(-1, keepdim=True)
        energy = riesz_log_energy(betas)
        for i, e in enumerate(energy.tolist()):
            if math.isfinite(e) and e < best_energy:
                best, best_energy, best_z = betas[i], e, float(chunk[i])
    if best is None:
        return project_simplex(kappa), Placement(mean, axes, m, 1.0)
    return best, Placement(mean, axes, m, best_z)


@register_algorithm("floco")
class Floco(Algorithm):
    description = "Last layer as a simplex of M endpoints; each client trains in an L1 ball around its center."
    citation = "Grinwald et al., NeurIPS 2024"
    client_state = "its subregion center on the simplex"
    newcomer = "the global model at a simplex point placed from its gradient signal"
    eval_adapt = ("the client's subregion center on the simplex (the barycenter before the assignment; "
                  "no training)")

    @dataclass
    class Hyperparams:
        endpoints: int = 10
        rho: float = tunable(0.1, Real(0.05, 0.5))
        tau: int = 10

        def __post_init__(self):
            if self.endpoints < 1:
                raise ValueError(f"endpoints must be >= 1 (got {self.endpoints})")
            if not self.rho >= 0:
                raise ValueError(f"rho must be >= 0 (got {self.rho})")
            if self.tau < 1 and self.tau != -1:
                raise ValueError(f"tau must be >= 1 (or -1 for half the rounds) (got {self.tau})")

    def __init__(self, ctx, hp):
        if not isinstance(ctx.model.head, nn.Linear):
            raise UserError("floco needs a model whose head is one linear layer")
        gen = torch.Generator().manual_seed(stream_seed(ctx.config.seed, "floco-endpoints"))
        ctx.model.head = SimplexHead(ctx.model.head, hp.endpoints, gen)
        super().__init__(ctx, hp)
        self.tau = hp.tau if hp.tau > 0 else max(1, ctx.config.rounds // 2)
        self.centers: torch.Tensor | None = None  # (clients, M) float64, once assigned
        self.placement: Placement | None = None  # the assignment's fitted map, for newcomers
        self.round = 0

    # -- alphas ----------------------------------------------------------------------------------
    def center(self, cid: int) -> torch.Tensor:
        m = self.hp.endpoints
        if self.centers is None:
            return torch.full((m,), 1.0 / m, dtype=torch.float64)
        return self.centers[cid]

    def alphas(self, cid: int, round_: int, n: int, whole: bool = False) -> torch.Tensor:
        """The n points client `cid` trains at in round `round_` (float64, CPU): on the whole
        simplex before the assignment (or when `whole`), else in its subregion."""
        m = self.hp.endpoints
        if m == 1:
            return torch.ones(n, 1, dtype=torch.float64)
        gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, round_, cid, "floco-alpha"))
        if self.centers is None or whole:
            return sample_simplex(n, m, gen)
        return sample_subregion(self.centers[cid], self.hp.rho, n, gen)

    # -- the hooks -------------------------------------------------------------------------------
    def begin_round(self, round_: int, sampled: list[int]) -> None:
        self.round = round_

    def local_train(self, cid: int, model: nn.Module, round_: int, whole: bool = False) -> TrainStats:
        trainer, epochs = self.ctx.trainer, self.ctx.config.local_epochs
        steps = epochs * math.ceil(self.ctx.clients[cid].n_train / trainer.batch_size)
        alphas = iter(self.alphas(cid, round_, steps, whole).to(self.ctx.device, torch.float32).unbind(0))
        alpha = model.head.alpha

        def loss_fn(net, x, y):
            alpha.copy_(next(alphas))
            return F.cross_entropy(net(x), y)

        return trainer.sgd(model, cid, epochs, round_, loss_fn=loss_fn)

    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        """The running mean; in the round that assigns subregions, also room for the signals."""
        acc = super().begin_aggregation(global_state, expected)
        if (self.round == self.tau < self.ctx.config.rounds and self.hp.endpoints > 1
                and self.centers is None):
            acc.extra.update(signals={}, start=global_state[ENDPOINTS])
        return acc

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """Average the upload; in the assignment round also keep the client's endpoint
        pseudo-gradient (one head-sized vector per client: all the projection needs of it)."""
        if "signals" in acc.extra:
            acc.extra["signals"][upload.cid] = (acc.extra["start"] - upload.payload[ENDPOINTS]).flatten()
        super().accumulate(acc, upload)

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        if "signals" in acc.extra:
            self.assign(acc.extra["signals"], global_state)
        return super().finish_aggregation(acc, global_state)

    def assign(self, signals: dict[int, torch.Tensor], global_state: State) -> None:
        """Complete the round's endpoint pseudo-gradients (a client not sampled trains once from the
        global model for its own) and project every client onto its subregion center."""
        start = global_state[ENDPOINTS]
        for cid in self.ctx.participants:
            if cid in signals:
                continue
            signals[cid] = self.signal(cid, global_state, self.round)
            self.ctx.count_traffic(down=nbytes(global_state), up=nbytes({ENDPOINTS: start}))
        members = self.ctx.participants
        stacked = torch.stack([signals[c] for c in members]).cpu()
        centers, self.placement = fit_centers(stacked, self.hp.endpoints)
        gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, "floco-snap"))
        snapped = [snap_center(c, self.hp.rho, gen) for c in centers]
        # rows by client id; a holdout client's row (never used: it is placed as a newcomer) is the barycenter
        m = self.hp.endpoints
        self.centers = torch.full((len(self.ctx.clients), m), 1.0 / m, dtype=torch.float64)
        for cid, c in zip(members, snapped):
            self.centers[cid] = c

    def signal(self, cid: int, global_state: State, round_: int) -> torch.Tensor:
        """Client `cid`'s gradient signal: global endpoints minus its endpoints after one local
        schedule from the global model, on the whole simplex (the assignment round's training)."""
        model = self.ctx.model
        set_state(model, global_state)
        self.local_train(cid, model, round_, whole=True)
        return (global_state[ENDPOINTS] - model.head.endpoints.detach()).flatten()

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        model = self.ctx.model
        set_state(model, global_state)
        model.head.alpha.copy_(self.center(cid).to(model.head.alpha.dtype))
        return model

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A newcomer is placed from its local data (the paper's rule for clients that join after
        the assignment): it computes its gradient signal from the current global model, one local
        schedule on the whole simplex (test-time work, counted in `eval_grad_evals`), which the
        assignment's fitted map (PCA axes, scale z) places on the simplex; it is tested there.
        Before the assignment it is tested at the barycenter, like every client."""
        m = self.hp.endpoints
        center = torch.full((m,), 1.0 / m, dtype=torch.float64)
        if self.centers is not None:
            placed = self.placement(self.signal(cid, global_state, self.round).cpu())
            gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, cid, "floco-newcomer-snap"))
            center = snap_center(placed, self.hp.rho, gen)
        model = self.ctx.model
        set_state(model, global_state)
        model.head.alpha.copy_(center.to(model.head.alpha.dtype))
        return model

    def summary(self) -> dict[str, float]:
        return {"floco_tau": self.tau, "floco_assigned": int(self.centers is not None)}

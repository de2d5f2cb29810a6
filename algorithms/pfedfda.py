"""pFedFDA: McLaughlin and Su, "Personalized Federated Learning via Feature Distribution
Adaptation", NeurIPS 2024 (arXiv:2411.00329; code: github.com/cj-mclaughlin/pFedFDA).

The classifier is generative: class-conditional Gaussians N(mu_c, Sigma) on the body's features
z, with one covariance shared by the classes, and class priors pi. It predicts with the linear
discriminant

    logit_c(z) = z^T Sigma'^{-1} mu_c - 1/2 mu_c^T Sigma'^{-1} mu_c + log pi_c,
    Sigma' = (1 - eps) Sigma + eps * tr(Sigma) / D * I           (shrinkage, as in the authors' code)

loaded into the model's linear head (weight Sigma'^{-1} mu_c, bias the rest).

Round, for a sampled client i, from the global body and the global statistics (mu_g, Sigma_g):
1. The head is set to the LDA of (mu_g, Sigma_g, the client's priors) and frozen; the body alone
   is trained for `local_epochs` of SGD with cross-entropy (the head is never trained: it is the
   global generative classifier, so every client fits its features to the same Gaussians).
2. Local statistics from the trained body's features of the client's training samples:
   class means (for classes with more than `folds` samples; other classes take mu_g), and the
   pooled within-class covariance S / (n - 1) + ridge * I.
3. Interpolation: mu_i = b_mu * mu_local + (1 - b_mu) * mu_g, Sigma_i = b_S * Sigma_local +
   (1 - b_S) * Sigma_g. With `beta = -1` (default) each client chooses (b_mu, b_S) by `folds`-fold
   stratified cross-validation on its training features (classes with fewer than `folds` samples
   left out), minimizing the summed cross-entropy of the LDA built from the other folds, as the
   paper does; but over a `grid` x `grid` grid on [0, 1]^2 rather than by L-BFGS (deterministic,
   no extra dependency). If no class has `folds` samples, b = 0 (the global statistics), as in the
   authors' code. With `beta` in [0, 1], b_mu = b_S = beta for every client.
4. Upload: the body and (mu_i, Sigma_i) (C*D + D*D floats). The server averages all three
   (sample-weighted) into the next body, mu_g and Sigma_g (the authors average the interpolated,
   "adaptive" statistics).
Download: the body and (mu_g, Sigma_g). The initial global statistics are mu_g ~ U[0, 1)^{C x D}
(seeded by the run's seed) and Sigma_g = I, as in the authors' code.

Evaluation (every client, read-only): the global body, steps 2-3 on the client's training
features, and the LDA of (mu_i, Sigma_i, the client's priors) as the head.

Hyperparameters:
  beta = -1     -1: per-client cross-validated (b_mu, b_S); a value in [0, 1]: fixed for all.
  folds = 2     cross-validation folds (the authors' `num_cv_folds`); also the minimum count
                (exclusive) for a class to get a local mean, as in their code.
  grid = 11     grid points per beta in the cross-validation search (step 0.1).
  eps = 1e-4    covariance shrinkage, and the smoothing of the priors ((n_c/n + eps), renormalized),
                both as in the authors' code.
  ridge = 1.0   added to the diagonal of every local covariance estimate. The authors' code adds
                `eps + I` (an identity and a constant eps on every entry, the latter presumably a
                typo for eps * I); we keep the identity, which dominates, and drop the constant.
  priors = local   the LDA's class priors: the client's training label distribution (the paper),
                or `uniform` (the authors' "global" evaluation uses uniform priors).

Differences from the published code, all deliberate: local statistics are computed from one
forward pass of the trained body over the training data (the authors reuse the features of all
local epochs' training batches, computed while the body was changing; FL-bench, and the FedOBP authors' fork of it, recompute
them at test time from one pass over the client's training data (its train loader,
`src/client/pfedfda.py`), as we do at every evaluation); no `cov_nearest` PSD projection
(a sample covariance plus a ridge, and convex combinations of such, are already positive
definite); grid search instead of L-BFGS; the cross-validation split is seeded by (seed, client)
so evaluation is deterministic.

Model: the algorithm replaces the model's linear head by a `GaussianHead`, which holds the global
statistics as frozen parameters (`head.means`, `head.cov`) beside the discriminant it predicts
with (`head.weight`, `head.bias`), so the statistics travel in the global state and their bytes
are counted from round 1 on.

Cost: training is FedAvg's (the same sample-gradients), but every participation and every
evaluation also runs the body over the client's training data for its statistics and fits
`grid` x `grid` x `folds` LDA classifiers (a D x D solve each) in the cross-validation; none of that
is a gradient, so it shows as time per sample-gradient: about 2.1x FedAvg's
(benchmarks/bench_algorithms.py: 1.36 s against 0.65 s per 1,000 on this project's CPU). The
method needs the statistics; `beta` in [0, 1] skips the cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.core.algorithm import Algorithm
from pflbench.errors import UserError
from pflbench.core.registry import register_algorithm
from pflbench.core.state import State, set_state, subset
from pflbench.core.training import TrainStats, stream_seed

MEANS, COV = "head.means", "head.cov"


def shrink(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 - eps) * cov + eps * tr(cov) / D * I, for one (D x D) or a batch (... x D x D) of
    covariances; a covariance that is all zero (every feature constant: a dead body, possible
    only with ridge = 0) shrinks towards I instead, so the result stays positive definite."""
    d = cov.shape[-1]
    scale = cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1 - eps) * cov + (eps * scale)[..., None, None] * eye


def lda_classifier(means: torch.Tensor, cov: torch.Tensor, priors: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (C x D) and bias (C) of the linear discriminant of N(means_c, cov) with `priors`."""
    chol = torch.linalg.cholesky(shrink(cov, eps))
    weight = torch.cholesky_solve(means.t(), chol).t()
    bias = -0.5 * (means * weight).sum(1) + torch.log(priors)
    return weight, bias


class GaussianHead(nn.Module):
    """A linear classifier (`weight`, `bias`: those of the head it replaces) with the class means
    and shared covariance it is derived from, kept as frozen parameters: the statistics are not
    trained by SGD, only estimated from features and averaged by the server."""

    def __init__(self, head: nn.Linear, means: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.means = nn.Parameter(means.to(head.weight.device), requires_grad=False)
        self.cov = nn.Parameter(cov.to(head.weight.device), requires_grad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


@register_algorithm("pfedfda")
class PFedFDA(Algorithm):
    description = "Body trained under a global Gaussian (LDA) head; clients interpolate local and global feature statistics."
    citation = "McLaughlin and Su, NeurIPS 2024"
    newcomer = "the global body and statistics interpolated with estimates from its data"
    eval_adapt = "Gaussian statistics refit on the client's training features, interpolated with the global ones"

    @dataclass
    class Hyperparams:
        beta: float = -1.0
        folds: int = 2
        grid: int = 11
        eps: float = 1e-4
        ridge: float = 1.0
        priors: Literal["local", "uniform"] = "local"

        def __post_init__(self):
            if not (self.beta == -1.0 or 0.0 <= self.beta <= 1.0):
                raise ValueError(f"beta must be -1 (cross-validated) or in [0, 1] (got {self.beta})")
            if self.folds < 2:
                raise ValueError(f"folds must be >= 2 (got {self.folds})")
            if self.grid < 2:
                raise ValueError(f"grid must be >= 2 (got {self.grid})")
            if not 0.0 <= self.eps < 1.0:
                raise ValueError(f"eps must be in [0, 1) (got {self.eps})")
            if self.ridge < 0:
                raise ValueError(f"ridge must be >= 0 (got {self.ridge})")
            if self.priors not in ("local", "uniform"):
                raise ValueError(f"priors must be local or uniform (got {self.priors})")

    def __init__(self, ctx, hp):
        head = ctx.model.head
        if not isinstance(head, nn.Linear) or head.out_features != ctx.num_classes or head.bias is None:
            raise UserError("pfedfda needs a model whose head is one linear layer (with bias) over the classes")
        gen = torch.Generator().manual_seed(stream_seed(ctx.config.seed, "pfedfda-init"))
        means = torch.rand(ctx.num_classes, head.in_features, generator=gen)
        ctx.model.head = GaussianHead(head, means, torch.eye(head.in_features))
        super().__init__(ctx, hp)
        self.stat_keys = (MEANS, COV)

    # -- what travels ---------------------------------------------------------------------------
    def download_keys(self, cid: int) -> tuple[str, ...]:
        return (*self.body_keys, *self.stat_keys)

    def upload(self, cid: int, trained: State) -> State:
        return subset(trained, (*self.body_keys, *self.stat_keys))

    # -- the round ------------------------------------------------------------------------------
    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        means_g, cov_g = self.global_stats(model)
        self.set_head(model, means_g, cov_g, cid)
        stats = self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_,
                                     params=self.params_of(model, self.body_keys))
        means, cov = self.adapt(cid, model, means_g, cov_g)
        with torch.no_grad():
            model.head.means.copy_(means)
            model.head.cov.copy_(cov)
        return stats

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """A newcomer builds its classifier as every client does at test time, from the global
        body and statistics interpolated with estimates from its own data: no history needed."""
        return self.eval_model(cid, global_state)

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        model = self.ctx.model
        set_state(model, global_state)
        means_g, cov_g = self.global_stats(model)
        means, cov = self.adapt(cid, model, means_g, cov_g)
        self.set_head(model, means, cov, cid)
        return model

    # -- the generative classifier --------------------------------------------------------------
    def global_stats(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return model.head.means.detach().double(), model.head.cov.detach().double()

    def priors(self, cid: int) -> torch.Tensor:
        c = self.ctx.num_classes
        if self.hp.priors == "uniform":
            return torch.full((c,), 1.0 / c, dtype=torch.float64, device=self.ctx.device)
        counts = self.ctx.label_counts(cid).double()
        smoothed = counts / counts.sum() + self.hp.eps
        return smoothed / smoothed.sum()

    @torch.no_grad()
    def set_head(self, model: nn.Module, means: torch.Tensor, cov: torch.Tensor, cid: int) -> None:
        weight, bias = lda_classifier(means, cov, self.priors(cid), self.hp.eps)
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)

    def features(self, model: nn.Module, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Body features (float64) and labels of client `cid`'s training samples."""
        feats, labels = self.ctx.trainer.body_features(model, cid)
        return feats.double(), labels

    def local_estimates(self, feats: torch.Tensor, labels: torch.Tensor, means_g: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class means (mu_g for classes with <= `folds` samples) and pooled covariance + ridge * I."""
        c = self.ctx.num_classes
        counts = torch.bincount(labels, minlength=c)
        sums = torch.zeros_like(means_g).index_add_(0, labels, feats)
        own = (counts > self.hp.folds)[:, None]
        means = torch.where(own, sums / counts.clamp(min=1)[:, None].to(sums), means_g)
        centered = feats - means[labels]
        cov = centered.t() @ centered / max(len(labels) - 1, 1)
        cov.diagonal().add_(self.hp.ridge)
        return means, cov

    @torch.no_grad()
    def adapt(self, cid: int, model: nn.Module, means_g: torch.Tensor, cov_g: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Client `cid`'s interpolated statistics (mu_i, Sigma_i) on `model`'s body."""
        feats, labels = self.features(model, cid)
        means_l, cov_l = self.local_estimates(feats, labels, means_g)
        if self.hp.beta >= 0:
            b_mu = b_cov = self.hp.beta
        else:
            b_mu, b_cov = self.cross_validated_betas(cid, feats, labels, means_g, cov_g)
        return b_mu * means_l + (1 - b_mu) * means_g, b_cov * cov_l + (1 - b_cov) * cov_g

    def folds_of(self, cid: int, labels: torch.Tensor) -> torch.Tensor:
        """Stratified fold of every sample (-1: its class has fewer than `folds` samples)."""
        k, n = self.hp.folds, len(labels)
        gen = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, "pfedfda-folds", cid))
        perm = torch.randperm(n, generator=gen).to(labels.device)
        order = perm[torch.sort(labels[perm], stable=True).indices]
        counts = torch.bincount(labels, minlength=self.ctx.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=labels.device) - starts[labels[order]]
        fold = torch.empty(n, dtype=torch.long, device=labels.device)
        fold[order] = rank % k
        fold[counts[labels] < k] = -1
        return fold

    def cross_validated_betas(self, cid: int, feats: torch.Tensor, labels: torch.Tensor,
                              means_g: torch.Tensor, cov_g: torch.Tensor) -> tuple[float, float]:
        """(b_mu, b_S) on the grid minimizing the summed held-out cross-entropy over the folds."""
        fold = self.folds_of(cid, labels)
        if not (fold >= 0).any():
            return 0.0, 0.0
        grid = torch.arange(self.hp.grid, dtype=torch.float64, device=feats.device) / (self.hp.grid - 1)
        log_priors = torch.log(self.priors(cid))
        loss = torch.zeros(len(grid), len(grid), dtype=torch.float64, device=feats.device)  # [b_mu, b_S]
        for k in range(self.hp.folds):
            train, test = (fold >= 0) & (fold != k), fold == k
            means_l, cov_l = self.local_estimates(feats[train], labels[train], means_g)
            covs = grid[:, None, None] * cov_l + (1 - grid)[:, None, None] * cov_g
            chol = torch.linalg.cholesky(shrink(covs, self.hp.eps))               # [b_S, D, D]
            solved_l = torch.cholesky_solve(means_l.t().expand(len(grid), -1, -1), chol)  # [b_S, D, C]
            solved_g = torch.cholesky_solve(means_g.t().expand(len(grid), -1, -1), chol)
            z, y = feats[test], labels[test]
            score_l, score_g = z @ solved_l, z @ solved_g                          # [b_S, n, C]
            q_ll = (means_l.t() * solved_l).sum(1)                                 # [b_S, C]
            q_lg = (means_l.t() * solved_g).sum(1)
            q_gg = (means_g.t() * solved_g).sum(1)
            for j, b in enumerate(grid.tolist()):
                quad = b * b * q_ll + 2 * b * (1 - b) * q_lg + (1 - b) ** 2 * q_gg
                logits = b * score_l + (1 - b) * score_g - 0.5 * quad[:, None, :] + log_priors
                logp = torch.log_softmax(logits, -1).gather(-1, y.expand(len(grid), -1)[..., None])
                loss[j] -= logp.squeeze(-1).mean(-1)
        best = int(torch.argmin(loss))
        return grid[best // len(grid)].item(), grid[best % len(grid)].item()

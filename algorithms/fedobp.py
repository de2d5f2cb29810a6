"""FedOBP: Chen, Du, Xu, Zhuang, Zhong, Muntean and Diao, "FedOBP: Federated Optimal Brain
Personalization through Cloud-Edge Element-wise Decoupling", arXiv:2604.16574, 2026.

Element-wise decoupling. Before client i trains, the server scores every eligible scalar element
by how far the client's last upload disagrees with the new global model: an Optimal-Brain-Damage
saliency keeping only the first-order term, with the gradient approximated by
(theta_i - theta_g) / eta (eta dropped):

    sqdiff:   I = (last_i - theta_g) ** 2          (default)
    abs_prod: I = |(last_i - theta_g) * last_i|

optionally smoothed over rounds (S_i = (1 - ema) * I + ema * S_i), normalized (global min-max,
per tensor, or none), and the k = round((1 - q) * #eligible) highest-scoring elements of the
whole model (one budget) keep the client's value; all others take the global value. Ties are
broken by element order. The score needs no data, so the server computes it (here, in
`client_start`, which is timed as server work): clients run plain SGD and upload the whole
model, and the server averages all elements, personalized ones included (sample-weighted).

On a client's first participation it starts from the global model (`first=global`, default);
`first=init` reproduces the authors' code, where every client's last upload starts as the initial
random model. Evaluation uses the same merge without advancing the smoothed score.
q = 1 is exactly FedAvg; q = 0 with every client joining every round is exactly Local.

Search space (`pflbench tune`, beside the run's learning rate): q in [0.999, 0.99999] with 1 - q
log-uniform (the paper tunes q per dataset and alpha between 0.999 and 0.99998); score either rule;
ema in [0, 0.9].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pflbench.core.algorithm import Algorithm
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Choice, NearOne, Real, tunable
from pflbench.core.state import State, min_max


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of the 1-D `scores`; among entries equal to the k-th
    largest, the earliest win. Equals marking the first k indices of
    `torch.sort(scores, descending=True, stable=True)`, without sorting (a sort of every element
    for every personalized client dominated FedOBP's server time)."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(n - k + 1).values
    mask = scores > threshold
    missing = k - int(mask.sum())
    ties = (scores == threshold).nonzero().flatten()[:missing]
    mask[ties] = True
    return mask


@register_algorithm("fedobp")
class FedOBP(Algorithm):
    description = "Element-wise decoupling: the server personalizes the top (1-q) elements by an OBD-style score."
    citation = "Chen et al., arXiv:2604.16574, 2026"
    client_state = "its last upload and, with ema, its smoothed importance scores"
    eval_adapt = "element merge of the current global model and the client's last upload (no training)"

    @dataclass
    class Hyperparams:
        q: float = tunable(0.9999, NearOne(0.999, 0.99999))
        score: Literal["sqdiff", "abs_prod"] = tunable("sqdiff", Choice(("sqdiff", "abs_prod")))
        ema: float = tunable(0.0, Real(0.0, 0.9))
        norm: Literal["global", "layer", "none"] = "global"
        eligible: Literal["all", "head"] = "all"
        first: Literal["global", "init"] = "global"

        def __post_init__(self):
            if not 0.0 <= self.q <= 1.0:
                raise ValueError(f"q must be in [0, 1] (got {self.q})")
            if not 0.0 <= self.ema < 1.0:
                raise ValueError(f"ema must be in [0, 1) (got {self.ema})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.eligible_keys = self.all_keys if hp.eligible == "all" else self.head_keys
        self.eligible_count = sum(p.numel() for n, p in ctx.model.named_parameters() if n in self.eligible_keys)
        self.total_count = sum(p.numel() for p in ctx.model.parameters())
        self.k = int(round((1.0 - hp.q) * self.eligible_count))
        self.last: dict[int, State] = {}
        self.smoothed: dict[int, State] = {}
        self.initial: State | None = None

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    def importance(self, last: State, global_state: State) -> State:
        if self.hp.score == "sqdiff":
            return {k: (last[k] - global_state[k]).square() for k in self.eligible_keys}
        return {k: ((last[k] - global_state[k]) * last[k]).abs() for k in self.eligible_keys}

    def smooth(self, cid: int, scores: State, advance: bool) -> State:
        previous = self.smoothed.get(cid)
        if self.hp.ema > 0 and previous is not None:
            scores = {k: scores[k].mul(1 - self.hp.ema).add_(previous[k], alpha=self.hp.ema) for k in scores}
        if advance and self.hp.ema > 0:
            self.smoothed[cid] = scores
        return scores

    def normalized(self, scores: State) -> torch.Tensor:
        """All eligible scores as one flat vector, normalized per `norm`; equal scores map to 0."""
        if self.hp.norm == "layer":
            parts = [min_max(scores[k].flatten()) for k in self.eligible_keys]
            return torch.cat(parts)
        flat = torch.cat([scores[k].flatten() for k in self.eligible_keys])
        return min_max(flat) if self.hp.norm == "global" else flat

    def personal_mask(self, flat_scores: torch.Tensor) -> torch.Tensor:
        """The k highest scores, ties at the threshold broken by element order (the first k of a
        stable descending sort), found in linear time: the k-th largest value by `kthvalue`, every
        element above it, then the earliest elements equal to it until k are taken."""
        return top_k_mask(flat_scores, self.k)

    def personalize(self, cid: int, global_state: State, advance: bool) -> State:
        last = self.last.get(cid)
        if last is None and self.hp.first == "init":
            last = self.initial
        if last is None or self.k == 0:
            return global_state
        mask = self.personal_mask(self.normalized(self.smooth(cid, self.importance(last, global_state), advance)))
        merged = dict(global_state)
        offset = 0
        for key in self.eligible_keys:
            n = global_state[key].numel()
            keep = mask[offset:offset + n].view_as(global_state[key])
            merged[key] = torch.where(keep, last[key], global_state[key])
            offset += n
        return merged

    def client_start(self, cid: int, global_state: State) -> State:
        if self.initial is None:
            self.initial = {k: v.clone() for k, v in global_state.items()}
        return self.personalize(cid, global_state, advance=True)

    def upload(self, cid: int, trained: State) -> State:
        self.last[cid] = trained
        return trained

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.personalize(cid, global_state, advance=False)

    def summary(self) -> dict[str, float]:
        return {"personalized_elements": self.k, "personalized_fraction": self.k / self.total_count}

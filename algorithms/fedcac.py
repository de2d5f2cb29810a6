"""FedCAC: Wu, Sun, Xu, Liu, Wang, Tian and Wang, "Bold but Cautious: Unlocking the Potential of
Personalized Federated Learning through Cautiously Aggressive Collaboration", ICCV 2023
(arXiv:2309.11103; the authors' code is in Fling, github.com/kxzxvbk/Fling:
`fling/component/client/fedcac_client.py`, `fling/component/group/fedcac_group.py`; PFLlib has a
port: `system/flcore/clients/clientcac.py`, `servers/servercac.py`).

Each client's parameters are split, by their sensitivity in its last local training, into
critical ones, which it shares only with clients whose critical parameters lie in similar places,
and non-critical ones, which everyone shares (FedAvg).

Round, for each sampled client i (t = 1, 2, ... the round):
1. Down: the server builds i's start model in `client_start`: the current global model, except at
   i's critical positions (from its last participation), which hold i's customized values. A client
   that never trained starts from the global model.
2. `local_epochs` of the run's SGD on the whole model (plain cross-entropy).
3. Up: the trained model theta. Its critical mask: the sensitivity of every element is
   |theta * (theta - theta_start)|, and in every parameter tensor (weight and bias separately, as
   both references do) the top int(tau * numel) elements are critical, ties broken by position.
   Only parameters are scored: normalization statistics, in a model that has them, are never
   critical and follow the global model (the references merge `named_parameters` only, so theirs
   stay with each client).
   The server computes the mask itself from the start model it sent and the model it received,
   so no mask travels (the references' server reads the clients' masks directly, and neither
   counts them as traffic).
Server, once the round's uploads are in (`aggregate`):
- the global model: the sample-weighted mean of the uploads (FedAvg);
- for every pair of sampled clients, the overlap of their masks, 1 - |m_i xor m_j| / (2 |m_i|);
  the threshold avg + (t / beta) * (max - avg), avg and max over the ordered pairs i != j of
  the round (so it rises from the average overlap towards the largest, and beyond it once
  t > beta: collaboration becomes more cautious as training goes on);
- i's collaborators: i itself and every j with overlap(i, j) >= threshold; i's customized values:
  the plain (unweighted) mean of their uploaded models, kept at i's critical positions only.
Evaluation: client i is tested with the model it would start from (step 1, read-only): the current
global model with its customized critical values. Nothing is trained at test time.

Aggregation needs every upload at once: the threshold depends on all pairwise overlaps of the
round, and a client's customized values are a mean over a set of other clients' models that is
known only then; so this class overrides `aggregate` and the engine collects the round's list
(memory of a round: the sampled clients' models).

Memory per client (server side, from its first participation on): its critical mask (one bool per
parameter) and its customized values at the critical positions (int(tau * numel) floats per
tensor): about (1 + 4 * tau) bytes per parameter; for fedavgcnn on FMNIST (582,026 parameters) at
tau = 0.5, 582,026 + 4 * 291,013 = 1,746,078 bytes. The client keeps nothing. Communication per
round: the whole (personalized) model down and the whole trained model up per sampled client,
exactly FedAvg's bytes; masks and customized models do not travel separately (the references send
the global model and the customized model, and the client merges them; here the server merges and
sends the one model the client trains from).

Hyperparameters:
  tau = 0.5      fraction of every tensor's elements that are critical: the authors' CIFAR-10
                 configuration in Fling (`flzoo/cifar10/cifar10_fedcac_resnet_config.py`; their
                 CIFAR-100 one uses 0.4). tau = 0 is exactly FedAvg (tested). PFLlib has no
                 FedCAC-specific default (its shared `tau` flag defaults to 1.0, every parameter
                 critical).
  beta = 100     rounds until the threshold reaches the largest overlap: the same Fling CIFAR-10
                 configuration (CIFAR-100: 170). PFLlib's flag defaults to 0, which its server
                 rejects (it asserts beta >= 1). Both references take beta as an integer.
  select = topk  `topk`: exactly int(tau * numel) critical elements per tensor (the paper's "top
                 tau"). `threshold`: both references' rule: every element at least the
                 int(tau * numel)-th largest sensitivity (ties can add elements), and, where that
                 value is <= 1e-10, every element above 1e-20 instead (fewer than int(tau * numel)).

Where the references differ, and what this file follows:
- Fling (the authors') trains every client every round and computes overlaps, threshold and
  customized models over all of them; PFLlib over the round's sampled clients, as here (with
  join ratio 1 the two agree).
- PFLlib skips the customized models after its first round, so after round 1 every client's
  critical parameters come from the initial model (its customized models start as copies of it);
  Fling customizes after every round, including the first, as here.
- Both merge on the client every round (also for clients not sampled); building the start model
  from the current global model and the kept critical values when the client is next used is the
  same model.

Search space (`pflbench tune`, beside the run's learning rate): tau in [0.1, 0.9] (around the
authors' 0.4 and 0.5, short of the degenerate 0 and 1); beta in [10, 1000], log scale, a decade
either side of the authors' 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from pflbench.core.algorithm import Algorithm, Upload
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Integer, Real, tunable
from pflbench.core.state import State, subset

Mask = dict[str, torch.Tensor]


def critical_masks(start: State, trained: State, tau: float, select: str = "topk") -> Mask:
    """Per tensor, the critical elements of a client's update: by sensitivity
    |trained * (trained - start)|, the top int(tau * numel) (`topk`; ties by position), or the
    references' threshold rule (`threshold`, see the module docstring)."""
    masks = {}
    for key, theta in trained.items():
        score = ((theta - start[key]) * theta).abs().flatten()
        n = score.numel()
        k = int(tau * n)
        if select == "topk":
            mask = torch.zeros(n, dtype=torch.bool, device=score.device)
            if k:
                mask[torch.argsort(score, descending=True, stable=True)[:k]] = True
        else:
            thresh = torch.topk(score, k).values[-1] if k else torch.tensor(math.inf, device=score.device)
            if thresh <= 1e-10:
                nonzero = score[score > 1e-20]
                if len(nonzero):
                    thresh = nonzero.min()
            mask = score >= thresh
        masks[key] = mask.view_as(theta)
    return masks


def overlap_matrix(masks: list[Mask]) -> list[list[float]]:
    """overlap[i][j] = 1 - |m_i xor m_j| / (2 |m_i|) over all tensors (0 where m_i is empty);
    the diagonal is 1."""
    sizes = [sum(int(m.sum()) for m in mask.values()) for mask in masks]
    s = len(masks)
    common = [[0] * s for _ in range(s)]
    for i in range(s):
        for j in range(i + 1, s):
            common[i][j] = common[j][i] = sum(int((masks[i][k] & masks[j][k]).sum()) for k in masks[i])
    out = [[1.0] * s for _ in range(s)]
    for i in range(s):
        for j in range(s):
            if i != j:
                differ = sizes[i] + sizes[j] - 2 * common[i][j]
                out[i][j] = 1.0 - differ / (2.0 * sizes[i]) if sizes[i] else 0.0
    return out


def collaboration_threshold(overlap: list[list[float]], round_: int, beta: int) -> float:
    """avg + (round / beta) * (max - avg) over the off-diagonal overlaps (inf with one client)."""
    off = [overlap[i][j] for i in range(len(overlap)) for j in range(len(overlap)) if i != j]
    if not off:
        return math.inf
    avg, top = sum(off) / len(off), max(off)
    return avg + round_ / beta * (top - avg)


def collaborators(overlap: list[list[float]], threshold: float) -> list[list[int]]:
    """For every client (by position): itself first, then every other client, in order, whose
    overlap with it reaches the threshold."""
    s = len(overlap)
    return [[i] + [j for j in range(s) if j != i and overlap[i][j] >= threshold] for i in range(s)]


@register_algorithm("fedcac")
class FedCAC(Algorithm):
    description = ("Critical parameters (top tau by |theta * update|) averaged only among clients with "
                   "overlapping critical masks; the rest by FedAvg.")
    citation = "Wu et al., ICCV 2023"
    client_state = ("server side: its critical mask (one bool per parameter) and its customized values "
                    "at the critical positions ({tau} of every tensor)")
    eval_adapt = "none (the global model with the client's customized values at its critical parameters)"

    @dataclass
    class Hyperparams:
        tau: float = tunable(0.5, Real(0.1, 0.9))
        beta: int = tunable(100, Integer(10, 1000, log=True))
        select: Literal["topk", "threshold"] = "topk"

        def __post_init__(self):
            if not 0.0 <= self.tau <= 1.0:
                raise ValueError(f"tau must be in [0, 1] (got {self.tau})")
            if self.beta < 1:
                raise ValueError(f"beta must be an integer >= 1 (got {self.beta})")
            if self.select not in ("topk", "threshold"):
                raise ValueError(f"select must be topk or threshold (got {self.select!r})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        # masks cover the model's parameters; other state (BatchNorm statistics, where the model
        # has them) is never critical and follows the global model
        self.masks: dict[int, Mask] = {}      # per client: its critical mask (server side)
        self.values: dict[int, State] = {}    # per client: customized values at its critical positions
        self.round = 0
        self.start: State | None = None       # the start model of the client now training
        self.pending: dict[int, Mask] = {}    # this round's new masks, committed in `aggregate`
        self.last_collaborators: dict[int, list[int]] = {}
        self.collab_sizes: list[int] = []

    def begin_round(self, round_: int, sampled: list[int]) -> None:
        self.round = round_

    def personalized(self, cid: int, global_state: State) -> State:
        """The global model with client `cid`'s customized values at its critical positions."""
        if cid not in self.masks:
            return global_state
        state = dict(global_state)
        for key, mask in self.masks[cid].items():
            merged = global_state[key].clone()
            merged[mask] = self.values[cid][key]
            state[key] = merged
        return state

    def client_start(self, cid: int, global_state: State) -> State:
        self.start = self.personalized(cid, global_state)
        return self.start

    def upload(self, cid: int, trained: State) -> State:
        """Send the whole trained model; the server derives the client's critical mask from it and
        the start model it sent."""
        self.pending[cid] = critical_masks(subset(self.start, self.param_keys), subset(trained, self.param_keys),
                                           self.hp.tau, self.hp.select)
        self.start = None
        return trained

    def aggregate(self, uploads: list[Upload], global_state: State) -> State:
        new_global = super().aggregate(uploads, global_state)
        masks = [self.pending.pop(u.cid) for u in uploads]
        self.pending.clear()
        overlap = overlap_matrix(masks)
        threshold = collaboration_threshold(overlap, self.round, self.hp.beta)
        groups = collaborators(overlap, threshold)
        self.last_collaborators = {}
        for i, upload in enumerate(uploads):
            group = groups[i]
            values = {}
            for key, mask in masks[i].items():
                total = upload.payload[key].clone()
                for j in group[1:]:
                    total += uploads[j].payload[key]
                values[key] = torch.div(total, float(len(group)))[mask]
            self.masks[upload.cid] = masks[i]
            self.values[upload.cid] = values
            self.last_collaborators[upload.cid] = [uploads[j].cid for j in group]
            self.collab_sizes.append(len(group))
        return new_global

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.personalized(cid, global_state)

    def summary(self) -> dict[str, float]:
        if not self.collab_sizes:
            return {}
        return {"fedcac_collaborators_mean": sum(self.collab_sizes) / len(self.collab_sizes)}

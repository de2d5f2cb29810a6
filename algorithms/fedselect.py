"""FedSelect: Tamirisa, Xie, Bao, Patel, Chen and Eddy, "FedSelect: Personalized Federated Learning
with Customized Selection of Parameters for Fine-Tuning", CVPR 2024
(code: github.com/lapisrocks/fedselect).

Each client grows a personal subnetwork, a binary mask over the elements of its weight tensors
(tensors with >= 2 dimensions; biases stay shared, see below). The mask starts empty (everything
shared) and grows every `grow_every` = N participations of the client, from the change of the
client's values over those N participations (GradSelect): delta = |theta trained at the N-th
participation - theta the client started from at the first of the N|. In each weight tensor with
n elements and s of them personal, the top round(p * (n - s)) shared elements by delta become
personal, but never beyond floor(max_personal * n) personal elements in that tensor. Ties are
broken by element order. So the mask is monotone, changes only at the client's participations
N, 2N, 3N, ..., and its size follows this schedule exactly. Between growths the mask is fixed, so
every candidate element was shared during the whole window and its start value is the global
value the client received at the window's first participation. A newly personal element keeps
the client's trained value from then on. N = 1 grows after every participation from that round's
update alone.

Growing versus pruning, and biases. The authors' code as first published (31653e8) had a
flag `--invert`, off by default. Off, every client's mask started full (everything personal, biases
included) and each update *pruned* it: in every tensor named "weight", the personal elements whose
change was at most the p-quantile became shared (until prune_target of the tensor was shared),
while biases were never touched and so stayed personal for good. With `--invert` the mask started
empty (everything shared) and *grew*: in every "weight" tensor, the shared elements whose change
was at least the (1 - p)-quantile became personal (up to prune_target personal), and biases, never
selected, stayed shared for good. The paper's GradSelect, a personal subnetwork grown from an empty
mask by the largest updates, is the `--invert` run; their later commit b6f8649 ("fix args") removed
the flag and hard-codes that mode. Here: the growing reading, and biases (and every tensor of fewer
than 2 dimensions) stay shared, as in `--invert`. (The models here have no normalization layers, so
">= 2 dimensions" selects exactly the tensors named "weight".)

Local schedule (LocalAlt, as the paper), from the global model with the client's personal values
put in: `local_epochs` of SGD on the personal elements only (shared ones frozen; batches from the
"fedselect-personal" stream), then `local_epochs` on the shared elements only (personal ones
frozen; the "train" stream FedAvg uses). Each phase has a fresh optimizer (the run's SGD) and
frozen elements are restored after every step (so momentum and weight decay cannot move them);
a phase with nothing to train is skipped. The authors' code alternates the two passes within
every epoch with plain SGD; we run them as two blocks (the FedAlt order of Pillutla et al., which
FedSelect builds on) with the same total number of passes, so that with an empty mask the round
is exactly a FedAvg round.

Aggregation: each element is averaged (sample-weighted) over this round's uploaders for which it
is shared; an element personal for every uploader keeps its global value. A tensor shared in full
by every uploader is averaged exactly as FedAvg does. (The authors' code averages unweighted over
the sharing clients; we weight by samples, as every other algorithm here.)

Communication: the whole global model down (the engine counts whole tensors; a client only uses
its shared elements, so a server could send fewer, but it would have to send the positions);
up, only the values of the client's shared elements, as flat tensors (a tensor the client shares
in full is sent as is). No mask is sent: the server holds a copy of every client's mask and
updates it exactly as the client does, from what it receives. The selection ranks the client's
shared elements by |uploaded value - value at the window's start|, and that start value is the
global value the server itself sent at the window's first participation: the server keeps it per
client until the window closes (per-client server state, no extra bytes; with N = 1 it is the
model it has just sent). So the positions of the uploaded values are known to both sides at no
cost.

Evaluation: the current global model with the client's personal values put in (a client that
never trained: the global model). With p = 0 the mask stays empty and FedSelect is exactly FedAvg.

Hyperparameters:
    p = 0.25              growth per growth step, as a fraction of the still-shared elements of
                          each weight tensor (the authors' code: prune_percent 25).
    max_personal = 0.8    cap on the personal fraction of each weight tensor (authors' code:
                          prune_target 80).
    grow_every = 3        participations per growth window (the authors' code: lth_epoch_iters
                          3); 1 grows after every participation.
Where the authors' code differs: every client participates every round and masks grow after the
rounds r (counted from 0) with r % 3 == 0 and r > 0, so the first window spans 4 rounds and the
later ones 3; the change is measured from the client's trained model at the previous growth (the
initial model for the first), before the server's averaging, where we measure it from the value
the client started the window with (what the server sent); a newly personal element takes that
round's server average before it is frozen as personal, where it keeps the client's trained value
here; and a tensor can overshoot the cap by one step, where we stop exactly at the cap. With
partial participation we count a client's own participations, not rounds.

Search space (`pflbench tune`, beside the run's learning rate): p in [0.05, 0.5] and max_personal in
[0.5, 0.95], around the authors' 0.25 and 0.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pflbench.core.algorithm import Accumulator, Algorithm, Upload
from pflbench.core.masked import train_elements
from pflbench.core.registry import register_algorithm
from pflbench.core.search import Real, tunable
from pflbench.core.state import State
from pflbench.core.training import TrainStats

PERSONAL_STREAM = "fedselect-personal"


@register_algorithm("fedselect")
class FedSelect(Algorithm):
    description = "Per-client personal subnetwork grown by the largest local updates (GradSelect) up to a cap."
    citation = "Tamirisa et al., CVPR 2024"
    client_state = "its personal mask and values, and the model at the start of its growth window"
    eval_adapt = "element merge of the current global model and the client's personal values (no training)"

    @dataclass
    class Hyperparams:
        p: float = tunable(0.25, Real(0.05, 0.5))
        max_personal: float = tunable(0.8, Real(0.5, 0.95))
        grow_every: int = 3

        def __post_init__(self):
            if not 0.0 <= self.p <= 1.0:
                raise ValueError(f"p must be in [0, 1] (got {self.p})")
            if not 0.0 <= self.max_personal <= 1.0:
                raise ValueError(f"max_personal must be in [0, 1] (got {self.max_personal})")
            if self.grow_every < 1:
                raise ValueError(f"grow_every must be an integer >= 1 (got {self.grow_every})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        params = dict(ctx.model.named_parameters())
        self.eligible = tuple(k for k in self.all_keys if k in params and params[k].dim() >= 2)  # weights, not BN statistics
        self.numels = {k: params[k].numel() for k in self.eligible}
        self.caps = {k: math.floor(hp.max_personal * n) for k, n in self.numels.items()}
        self.total = sum(p.numel() for p in ctx.model.parameters())
        self.masks: dict[int, dict[str, torch.Tensor]] = {}  # per client: True = personal
        self.sent_masks: dict[int, dict[str, torch.Tensor]] = {}  # the masks this round's uploads used
        self.participations: dict[int, int] = {}  # per client: participations so far
        # per client with an open growth window: the weight tensors it started the window from
        # (states are never modified in place, so these are references, not copies)
        self.window_start: dict[int, State] = {}

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    # -- masks -----------------------------------------------------------------------------------
    def mask_of(self, cid: int) -> dict[str, torch.Tensor]:
        return self.masks.get(cid, {})

    def growth(self, personal: int, numel: int, cap: int) -> int:
        """How many elements a tensor's mask gains: round(p * shared), within the cap."""
        return max(0, min(cap - personal, int(round(self.hp.p * (numel - personal)))))

    def can_grow(self, cid: int) -> bool:
        """Whether some weight tensor of the client's mask would still gain elements."""
        mask = self.mask_of(cid)
        return any(self.growth(int(mask[k].sum()) if k in mask else 0, numel, self.caps[k]) > 0
                   for k, numel in self.numels.items())

    def grown(self, mask: dict[str, torch.Tensor], trained: State, start: State) -> dict[str, torch.Tensor]:
        new = dict(mask)
        for key in self.eligible:
            current = mask.get(key)
            numel = trained[key].numel()
            personal = 0 if current is None else int(current.sum())
            k = self.growth(personal, numel, self.caps[key])
            if k == 0:
                continue
            delta = (trained[key] - start[key]).abs().flatten()
            if current is not None:
                delta = delta.masked_fill(current.flatten(), -1.0)  # personal ones are never picked
            order = torch.sort(delta, descending=True, stable=True).indices[:k]
            flat = torch.zeros(numel, dtype=torch.bool, device=delta.device) if current is None \
                else current.flatten().clone()
            flat[order] = True
            new[key] = flat.view_as(trained[key])
        return new

    def merged(self, cid: int, global_state: State) -> State:
        state = dict(global_state)
        for key, m in self.mask_of(cid).items():
            state[key] = global_state[key].masked_scatter(m, self.kept[cid][key])
        return state

    # -- the hooks -------------------------------------------------------------------------------
    def client_start(self, cid: int, global_state: State) -> State:
        start = self.merged(cid, global_state)
        if self.participations.get(cid, 0) % self.hp.grow_every == 0 and self.can_grow(cid):
            self.window_start[cid] = {k: start[k] for k in self.eligible}  # a window opens
        return start

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        epochs = self.ctx.config.local_epochs
        mask = self.mask_of(cid)
        if not mask:
            return self.ctx.trainer.sgd(model, cid, epochs, round_)
        personal = {n: mask[n] if n in mask else torch.zeros_like(p, dtype=torch.bool)
                    for n, p in model.named_parameters()}
        stats = train_elements(self.ctx.trainer, model, cid, epochs, round_, personal, purpose=PERSONAL_STREAM)
        shared = {n: ~m for n, m in personal.items()}
        stats += train_elements(self.ctx.trainer, model, cid, epochs, round_, shared)
        return stats

    def upload(self, cid: int, trained: State) -> State:
        mask = self.mask_of(cid)
        payload = {}
        for key in self.all_keys:
            m = mask.get(key)
            if m is None or not bool(m.any()):
                payload[key] = trained[key]
            elif not bool(m.all()):
                payload[key] = trained[key][~m]
        self.sent_masks[cid] = mask
        count = self.participations[cid] = self.participations.get(cid, 0) + 1
        if count % self.hp.grow_every == 0 and cid in self.window_start:
            # the window closes: the server repeats this from the payload and the start it sent
            mask = self.grown(mask, trained, self.window_start.pop(cid))
        if mask:
            self.masks[cid] = mask
            self.kept[cid] = {k: trained[k][m] for k, m in mask.items()}
        return payload

    # -- aggregation, streamed: a tensor some client keeps partly personal is averaged per element
    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        """Which tensors need the per-element mean is known before any upload: those some expected
        client's mask touches (the mask it trains and sends with this round, before any growth).
        Those get float64 sums of values and of weights; every other tensor the running mean."""
        acc = super().begin_aggregation(global_state, expected)
        masks = [self.sent_masks.get(cid, self.mask_of(cid)) for cid in expected]
        partial = [k for k in self.all_keys if any(k in m and bool(m[k].any()) for m in masks)]
        acc.extra["num"] = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in partial}
        acc.extra["den"] = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in partial}
        return acc

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """Whole tensors join the running mean; the others add their shared elements, by the mask
        the client sent with, to the per-element sums."""
        if not upload.payload:
            return
        num, den = acc.extra["num"], acc.extra["den"]
        mask = self.sent_masks.pop(upload.cid, {})
        acc.mean.add({k: v for k, v in upload.payload.items() if k not in num}, upload.n_train)
        for key in num.keys() & upload.payload.keys():  # a tensor personal in full was not sent
            m = mask.get(key)
            share = ~m if m is not None and bool(m.any()) else torch.ones_like(num[key], dtype=torch.bool)
            values = torch.zeros_like(num[key]).masked_scatter(share, upload.payload[key].double())
            num[key] += upload.n_train * values
            den[key] += upload.n_train * share

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        """Each element: the sample-weighted mean over the clients that shared it; an element
        every uploader kept personal stays as it was."""
        self.sent_masks = {}
        out = super().finish_aggregation(acc, global_state)
        for key, num in acc.extra["num"].items():
            den = acc.extra["den"][key]
            mean = (num / den.clamp_min(1)).to(global_state[key].dtype)
            out[key] = torch.where(den > 0, mean, global_state[key])
        return out

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.merged(cid, global_state)

    def summary(self) -> dict[str, float]:
        """Mean personal fraction over all clients (a client that never trained has none)."""
        personal = sum(int(m.sum()) for masks in self.masks.values() for m in masks.values())
        return {"personalized_fraction": personal / (self.total * len(self.ctx.clients))}

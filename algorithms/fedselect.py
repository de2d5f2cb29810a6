"""FedSelect: Tamirisa, Xie, Bao, Patel, Chen and Eddy, "FedSelect: Personalized Federated Learning
with Customized Selection of Parameters for Fine-Tuning", CVPR 2024
(code: github.com/lapisrocks/fedselect).

Each client grows a personal subnetwork, a binary mask over the elements of its weight tensors
(tensors with >= 2 dimensions; biases stay shared, as in the authors' code). The mask starts empty
(everything shared) and, after every participation, grows by the shared elements whose local
update |theta_trained - theta_start| is largest (GradSelect): in each weight tensor with n
elements and s of them personal, the top round(p * (n - s)) shared elements by update magnitude
become personal, but never beyond floor(max_personal * n) personal elements in that tensor. Ties
are broken by element order. So the mask is monotone and its size follows this schedule exactly.
A newly personal element keeps the client's trained value from then on.

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
updates it exactly as the client does, from what it receives (the selection ranks shared
elements by |uploaded value - global value sent|, both known to the server), so the positions
of the uploaded values are known to both sides at no cost.

Evaluation: the current global model with the client's personal values put in (a client that
never trained: the global model). With p = 0 the mask stays empty and FedSelect is exactly FedAvg.

Hyperparameters:
    p = 0.25              growth per participation, as a fraction of the still-shared elements
                          of each weight tensor (the authors' code: prune_percent 25).
    max_personal = 0.8    cap on the personal fraction of each weight tensor (authors' code:
                          prune_target 80).
The authors' code grows masks every 3 rounds with every client participating every round, from
the change over those 3 rounds (lth_epoch_iters = 3), and can overshoot the cap by one step; we
grow after every participation from that round's update (with partial participation a client's
rounds are sparse) and stop exactly at the cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pflbench.algorithm import Algorithm, Upload
from pflbench.masked import train_elements
from pflbench.registry import register_algorithm
from pflbench.state import State, weighted_mean
from pflbench.training import TrainStats

PERSONAL_STREAM = "fedselect-personal"


@register_algorithm("fedselect")
class FedSelect(Algorithm):
    description = "Per-client personal subnetwork grown by the largest local updates (GradSelect) up to a cap."
    citation = "Tamirisa et al., CVPR 2024"
    eval_adapt = "element merge of the current global model and the client's personal values (no training)"

    @dataclass
    class Hyperparams:
        p: float = 0.25
        max_personal: float = 0.8

        def __post_init__(self):
            if not 0.0 <= self.p <= 1.0:
                raise ValueError(f"p must be in [0, 1] (got {self.p})")
            if not 0.0 <= self.max_personal <= 1.0:
                raise ValueError(f"max_personal must be in [0, 1] (got {self.max_personal})")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        params = dict(ctx.model.named_parameters())
        self.eligible = tuple(k for k in self.all_keys if params[k].dim() >= 2)
        self.caps = {k: math.floor(hp.max_personal * params[k].numel()) for k in self.eligible}
        self.total = sum(p.numel() for p in ctx.model.parameters())
        self.masks: dict[int, dict[str, torch.Tensor]] = {}  # per client: True = personal
        self.sent_masks: dict[int, dict[str, torch.Tensor]] = {}  # the masks this round's uploads used
        self.round_global: State = {}

    def download_keys(self, cid: int) -> tuple[str, ...]:
        return self.all_keys

    # -- masks -----------------------------------------------------------------------------------
    def mask_of(self, cid: int) -> dict[str, torch.Tensor]:
        return self.masks.get(cid, {})

    def growth(self, personal: int, numel: int, cap: int) -> int:
        """How many elements a tensor's mask gains: round(p * shared), within the cap."""
        return max(0, min(cap - personal, int(round(self.hp.p * (numel - personal)))))

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
        self.round_global = global_state
        return self.merged(cid, global_state)

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
        new = self.grown(mask, trained, self.round_global)  # the server repeats this from the payload
        if new:
            self.masks[cid] = new
            self.kept[cid] = {k: trained[k][m] for k, m in new.items()}
        return payload

    def aggregate(self, uploads: list[Upload], global_state: State) -> State:
        sent = [u for u in uploads if u.payload]
        masks = [self.sent_masks.get(u.cid, {}) for u in sent]
        self.sent_masks = {}
        if not sent:
            return global_state
        out = dict(global_state)
        for key in self.all_keys:
            partial = [m.get(key) is not None and bool(m[key].any()) for m in masks]
            if not any(partial):
                out[key] = weighted_mean([{key: u.payload[key]} for u in sent], [u.n_train for u in sent])[key]
                continue
            num = torch.zeros_like(global_state[key], dtype=torch.float64)
            den = torch.zeros_like(global_state[key], dtype=torch.float64)
            for u, m, part in zip(sent, masks, partial):
                if key not in u.payload:
                    continue  # personal in full for this client
                share = ~m[key] if part else torch.ones_like(global_state[key], dtype=torch.bool)
                values = torch.zeros_like(num).masked_scatter(share, u.payload[key].double())
                num += u.n_train * values
                den += u.n_train * share
            mean = (num / den.clamp_min(1)).to(global_state[key].dtype)
            out[key] = torch.where(den > 0, mean, global_state[key])
        return out

    def eval_state(self, cid: int, global_state: State) -> State:
        return self.merged(cid, global_state)

    def summary(self) -> dict[str, float]:
        """Mean personal fraction over all clients (a client that never trained has none)."""
        personal = sum(int(m.sum()) for masks in self.masks.values() for m in masks.values())
        return {"personalized_fraction": personal / (self.total * len(self.ctx.clients))}

"""The hooks an algorithm overrides; the defaults are FedAvg.

The engine (:mod:`pflbench.core.engine`) owns the round loop and calls these hooks; an algorithm
overrides only what makes it different. State is a `{parameter name: tensor}` dict.

Per round, for each sampled client ``cid``:

1. ``client_start(cid, global_state)``: the state the client trains from (server side: it
   merges the global model with what the server keeps for the client).
2. ``local_train(cid, model, round_)``: the local schedule; default: SGD epochs on all parameters.
3. ``upload(cid, trained)``: what the client sends, and what it keeps for itself.

then ``aggregate(uploads, global_state)`` builds the next global state, and at evaluation
``eval_state(cid, global_state)`` gives the state that client would use (``eval_model`` the
module, for predictors that are not a single model state).

Personal parameters are declared by role (`personal = "head"`, `"body"`, `"all"` or `None`), from
the model's named `body` and `head` submodules; an algorithm with finer control (an element
mask) overrides the hooks directly. An algorithm that changes the architecture (a simplex of heads,
a generative classifier) replaces `ctx.model.head` or `.body` before calling `Algorithm.__init__`,
which reads the parameter names from the model; the engine reads the global state after that.

Every algorithm declares its test-time adaptation in `eval_adapt`: what a client does between
receiving its state and being tested ("none" for FedAvg; FedBABU fine-tunes; Per-FedAvg takes a
gradient step). It is a format string over the hyperparameters, so the summary and `pflbench list`
say e.g. "fine-tune 5 epochs from the global model". The engine's `--finetune-epochs` is separate:
it adds `_ft` figures to any algorithm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pflbench.experiments.config import RunConfig
from pflbench.core.models import SplitModel, param_roles
from pflbench.core.state import State, set_state, subset, weighted_mean
from pflbench.core.training import ClientData, Trainer, TrainStats

Role = Literal["head", "body", "all"]


@dataclass
class NoHyperparams:
    """An algorithm without hyperparameters of its own."""


@dataclass
class Upload:
    """What one client sent in one round: its id, its number of training samples, the tensors."""

    cid: int
    n_train: int
    payload: State


@dataclass
class Context:
    """What the engine gives an algorithm: the run's settings, the shared model, the clients."""

    config: RunConfig
    model: SplitModel
    trainer: Trainer
    clients: list[ClientData]
    device: torch.device
    num_classes: int
    comm: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})

    def count_traffic(self, down: int = 0, up: int = 0) -> None:
        """Add bytes an algorithm moves outside the engine's per-client download and upload (a
        one-off exchange such as Floco's subregion assignment), so the run's totals stay whole."""
        self.comm["down"] += down
        self.comm["up"] += up

    def label_counts(self, cid: int) -> torch.Tensor:
        """Class counts of client `cid`'s training samples (length: number of classes)."""
        labels = self.trainer.data.y[self.clients[cid].train]
        return torch.bincount(labels, minlength=self.num_classes)


class Algorithm:
    """FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017): every parameter shared, sample-weighted averaging."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    Hyperparams: ClassVar[type] = NoHyperparams
    personal: ClassVar[Role | None] = None
    eval_adapt: ClassVar[str] = "none"

    def __init__(self, ctx: Context, hp: Any):
        self.ctx = ctx
        self.hp = hp
        roles = param_roles(ctx.model)
        self.all_keys: tuple[str, ...] = tuple(roles)
        self.body_keys: tuple[str, ...] = tuple(k for k, r in roles.items() if r == "body")
        self.head_keys: tuple[str, ...] = tuple(k for k, r in roles.items() if r == "head")
        if self.personal == "all":
            personal = set(roles)
        elif self.personal in ("head", "body"):
            personal = {k for k, r in roles.items() if r == self.personal}
        else:
            personal = set()
        self.personal_keys: tuple[str, ...] = tuple(k for k in roles if k in personal)
        self.shared_keys: tuple[str, ...] = tuple(k for k in roles if k not in personal)
        self.kept: dict[int, State] = {}

    # -- what travels ---------------------------------------------------------------------------
    def download_keys(self, cid: int) -> tuple[str, ...]:
        """Names of the global tensors sent to client `cid` (counted as download bytes)."""
        return self.shared_keys

    # -- the hooks ------------------------------------------------------------------------------
    def begin_round(self, round_: int, sampled: list[int]) -> None:
        """Called once before each round's clients train (e.g. for schedules that change with
        the round, or server-side preparation that needs the sampled set)."""

    def client_start(self, cid: int, global_state: State) -> State:
        """The state client `cid` trains from: the global model under what the client kept."""
        return {**global_state, **self.kept.get(cid, {})}

    def local_train(self, cid: int, model: nn.Module, round_: int) -> TrainStats:
        """Local schedule: `local_epochs` of SGD on every parameter, fresh optimizer."""
        return self.ctx.trainer.sgd(model, cid, self.ctx.config.local_epochs, round_)

    def upload(self, cid: int, trained: State) -> State:
        """Keep the personal tensors on the client; send the shared ones."""
        if self.personal_keys:
            self.kept[cid] = subset(trained, self.personal_keys)
        return subset(trained, self.shared_keys)

    def aggregate(self, uploads: list[Upload], global_state: State) -> State:
        """Sample-weighted mean of every uploaded tensor; tensors nobody sent stay as they were."""
        sent = [u for u in uploads if u.payload]
        if not sent:
            return global_state
        mean = weighted_mean([u.payload for u in sent], [u.n_train for u in sent])
        return {**global_state, **mean}

    def eval_state(self, cid: int, global_state: State) -> State:
        """The state client `cid` is evaluated with: the global model under what the client kept.
        Must not change the algorithm's state (so it does not call `client_start`, which may)."""
        return {**global_state, **self.kept.get(cid, {})}

    def eval_model(self, cid: int, global_state: State) -> nn.Module:
        """The module client `cid` is evaluated with: by default the shared model loaded with
        `eval_state`. Override for predictors that are not one state of the model (a mixture of
        two models, two heads, a generative classifier); return a scratch module, since the
        engine may fine-tune it."""
        set_state(self.ctx.model, self.eval_state(cid, global_state))
        return self.ctx.model

    @classmethod
    def describe_eval_adaptation(cls, hp: Any) -> str:
        """`eval_adapt` with the hyperparameters filled in (e.g. "fine-tune 5 epochs")."""
        values = dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else {}
        return cls.eval_adapt.format(**values)

    def eval_adaptation(self) -> str:
        return self.describe_eval_adaptation(self.hp)

    def summary(self) -> dict[str, Any]:
        """Extra figures for the run's summary.json (e.g. FedOBP's personalized fraction)."""
        return {}

    # -- helpers for subclasses -----------------------------------------------------------------
    def params_of(self, model: nn.Module, keys: tuple[str, ...]) -> list[torch.Tensor]:
        """The model's parameter tensors named in `keys` (e.g. to train only the head)."""
        wanted = set(keys)
        return [p for n, p in model.named_parameters() if n in wanted]

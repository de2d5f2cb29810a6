"""The hooks an algorithm overrides; the defaults are FedAvg.

The engine (:mod:`pflbench.core.engine`) owns the round loop and calls these hooks; an algorithm
overrides only what makes it different. State is a `{parameter name: tensor}` dict.

Per round, for each sampled client ``cid``:

1. ``client_start(cid, global_state)``: the state the client trains from (server side: it
   merges the global model with what the server keeps for the client).
2. ``local_train(cid, model, round_)``: the local schedule; default: SGD epochs on all parameters.
3. ``upload(cid, trained)``: what the client sends, and what it keeps for itself.

then the server builds the next global state, and at evaluation ``eval_state(cid, global_state)``
gives the state that client would use (``eval_model`` the module, for predictors that are not a
single model state). A client that never trained (``--holdout-clients``) is scored with
``newcomer_model(cid, global_state)``: the global model unless the method defines what a newcomer
gets. The clients that train are ``ctx.participants``; an algorithm that loops over "every client"
(an all-client step, a normalizer N) loops over those.

Aggregation streams: a round's memory is one model plus what the algorithm keeps per client, not
one upload per sampled client. After ``begin_round`` and before the first client trains,
``begin_aggregation(global_state, expected)`` opens an accumulator (`expected`: the clients that
will upload, with their training sample counts, so a mean's normalizer is known before the first
upload); ``accumulate(acc, upload)`` folds in each upload right after it is made, before the next
client trains, and the engine drops it (so it may change what the server keeps for that client,
never what the round's other clients start from); ``finish_aggregation(acc, global_state)`` gives
the next global state. The default is a running sample-weighted mean, bit-identical to
``weighted_mean`` over the collected list (a tensor only some clients sent is averaged over
those, within one rounding); ``aggregation_weight`` changes the weights, and an algorithm with
more bookkeeping (a server step per upload, a masked mean, a signal kept per client) overrides
the three hooks. Overriding ``aggregate(uploads, global_state)`` instead is how an algorithm says
it needs every upload at once: the engine then collects the round's list and calls it
(``streams_aggregation`` tells which path is taken; the engine checks for the override itself
rather than trusting a flag, so an overridden `aggregate` can never be silently skipped). The
default `aggregate` runs the three hooks over the list, so both paths compute the same thing.

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

Every algorithm also declares what it keeps per client between rounds, in `client_state` (client
side or server side: a personal head, a control variate, a whole model, ...), so memory and
privacy are read off `pflbench list`; left empty it follows from `personal`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pflbench.experiments.config import RunConfig
from pflbench.core.models import SplitModel, param_roles
from pflbench.core.state import RunningMean, State, set_state, subset
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
class Accumulator:
    """A round's aggregation in progress: the running mean of the uploads, the clients expected to
    upload (id: training samples), and room for an algorithm's own bookkeeping of the round."""

    mean: RunningMean
    expected: dict[int, int]
    extra: dict[str, Any] = field(default_factory=dict)


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
    participants: tuple[int, ...] = ()  # the clients that train (all but the holdout clients)

    def __post_init__(self) -> None:
        if not self.participants:
            self.participants = tuple(range(len(self.clients)))

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
    client_state: ClassVar[str] = ""
    model_needs: ClassVar[str | None] = None  # "batchnorm": `--model auto` picks a BatchNorm model
    newcomer: ClassVar[str] = "the global model"  # what `newcomer_model` gives a holdout client

    def __init__(self, ctx: Context, hp: Any):
        self.ctx = ctx
        self.hp = hp
        roles = param_roles(ctx.model)
        self.all_keys: tuple[str, ...] = tuple(roles)
        # the trainable tensors: the state minus normalization statistics (which have no gradient)
        self.param_keys: tuple[str, ...] = tuple(n for n, _ in ctx.model.named_parameters())
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

    # -- aggregation: streamed as uploads arrive (see the module docstring) ---------------------
    def aggregation_weight(self, cid: int, n_train: int) -> float:
        """How much client `cid`'s upload counts in the mean: its number of training samples."""
        return n_train

    def begin_aggregation(self, global_state: State, expected: dict[int, int]) -> Accumulator:
        """Open a round's accumulator; `expected` maps the clients that will upload to their
        training sample counts (the mean's normalizer is their total weight, known up front)."""
        total = sum(self.aggregation_weight(cid, n) for cid, n in expected.items())
        return Accumulator(RunningMean(total), dict(expected))

    def accumulate(self, acc: Accumulator, upload: Upload) -> None:
        """Fold one upload into the accumulator; the engine drops the upload afterwards. An empty
        upload (nothing shared) counts for nothing."""
        if upload.payload:
            acc.mean.add(upload.payload, self.aggregation_weight(upload.cid, upload.n_train))

    def finish_aggregation(self, acc: Accumulator, global_state: State) -> State:
        """The next global state: the weighted mean of every tensor sent (each over the clients
        that sent it); tensors nobody sent stay as they were."""
        return {**global_state, **acc.mean.result()}

    def aggregate(self, uploads: list[Upload], global_state: State) -> State:
        """The next global state from the round's collected uploads. Override it only when the
        aggregation needs every upload at once (the engine then keeps the list); by default it
        runs the streaming hooks over the list, so both paths give the same bits."""
        acc = self.begin_aggregation(global_state, {u.cid: u.n_train for u in uploads if u.payload})
        for upload in uploads:
            self.accumulate(acc, upload)
        return self.finish_aggregation(acc, global_state)

    def streams_aggregation(self) -> bool:
        """Whether the engine streams uploads into the hooks: yes unless `aggregate` was replaced,
        by the class or on the instance (a wrapper that records the uploads needs the list)."""
        return getattr(self.aggregate, "__func__", None) is Algorithm.aggregate

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

    def newcomer_model(self, cid: int, global_state: State) -> nn.Module:
        """The module a client that never trained (`--holdout-clients`) is scored with: by default
        the global model, which is all a newcomer has of a method without a rule of its own (the
        engine's `--finetune-epochs` then adds the fine-tuned figure). Override where the method
        says what a newcomer gets, e.g. a test-time adaptation that needs no history (FedBABU's
        fine-tuning, Per-FedAvg's step) or a placement from local data (Floco). Returns a scratch
        module, like `eval_model`; must not change the algorithm's state."""
        set_state(self.ctx.model, global_state)
        return self.ctx.model

    @classmethod
    def describe_eval_adaptation(cls, hp: Any) -> str:
        """`eval_adapt` with the hyperparameters filled in (e.g. "fine-tune 5 epochs")."""
        values = dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else {}
        return cls.eval_adapt.format(**values)

    @classmethod
    def describe_client_state(cls, hp: Any) -> str:
        """What the algorithm keeps per client between rounds (`client_state`, or what `personal`
        implies), with the hyperparameters filled in."""
        if cls.client_state:
            values = dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else {}
            return cls.client_state.format(**values)
        return {"head": "its head", "body": "its body", "all": "its whole model",
                None: "nothing"}[cls.personal]

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

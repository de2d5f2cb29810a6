"""The training flags shared by `pflbench run` and `pflbench sweep`, declared once.

Each flag is a field of :class:`~pflbench.experiments.config.RunConfig`; `run` shows the config's default,
`sweep` leaves it unset so a preset or config file can supply it. :func:`with_run_flags` adds
the flags to a command's signature, which is what typer reads.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import typer

from pflbench.experiments.config import RunConfig

RUN_FLAGS: dict[str, str] = {
    "partition": "dirichlet, exdir, shards, iid, quantity or natural.",
    "classes_per_client": "Classes per client for --partition shards and exdir.",
    "sigma": "Quantity skew (--partition quantity): spread of client sizes; larger is more skewed.",
    "size_dist": "Quantity skew: lognormal or powerlaw client sizes.",
    "natural_pick": "Natural partition: the --clients largest clients, or a seeded sample.",
    "feature_skew": "none, rotate or noise: each client sees its inputs through its own transform.",
    "skew_strength": "Feature skew: largest rotation in degrees, or largest noise std.",
    "holdout_clients": "Share of clients that never train, scored as newcomers (acc_new).",
    "clients": "Number of clients.",
    "join_ratio": "Fraction of clients sampled each round, in (0, 1].",
    "rounds": "Communication rounds.",
    "local_epochs": "Local epochs per round.",
    "batch_size": "Local mini-batch size.",
    "lr": "SGD learning rate.",
    "momentum": "SGD momentum (the optimizer is fresh every round).",
    "weight_decay": "SGD weight decay.",
    "model": "fedavgcnn, fedavgcnn_bn, lenet5, mlp, resnet18, resnet18_pretrained, smallcnn_bn or auto.",
    "eval_every": "Evaluate every K rounds (and after the last).",
    "finetune_epochs": "Also report accuracy after K local fine-tuning epochs (_ft metrics).",
    "test_ratio": "Share of each client's samples held out as its local test set.",
    "min_samples": "Minimum samples per client (Dirichlet).",
    "val_ratio": "Share of each client's training samples held out for validation (0: none).",
    "precision": "fp32, or bf16 (autocast for local training and evaluation).",
}
_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def with_run_flags(command: Callable[..., Any], unset_defaults: bool = False) -> Callable[..., Any]:
    """Give `command` (which takes **flags) one keyword option per entry of RUN_FLAGS."""
    signature = inspect.signature(command)
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    added = []
    for name, help_text in RUN_FLAGS.items():
        kind = type(_FIELDS[name].default)
        default = None if unset_defaults else _FIELDS[name].default
        added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                       default=typer.Option(default, help=help_text),
                                       annotation=Optional[kind] if unset_defaults else kind))
    command.__signature__ = signature.replace(parameters=[*kept, *added])
    return command


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the user actually set (sweep flags default to None)."""
    return {k: v for k, v in flags.items() if v is not None}

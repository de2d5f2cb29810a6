"""Named sweep settings: a preset fills every setting a flag or config file leaves unset."""

from __future__ import annotations

from typing import Any

from pflbench.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    # Offline and small: every algorithm at two alphas, three seeds (so every cell has an interval
    # over seeds as well as clients), in minutes on two CPU cores.
    "quick": {
        "datasets": ["digits"], "alphas": [0.1, 0.5], "seeds": [0, 1, 2],
        "clients": 10, "join_ratio": 1.0, "rounds": 10, "local_epochs": 2, "batch_size": 32,
        "lr": 0.05, "momentum": 0.0, "model": "mlp", "eval_every": 5,
    },
    # The protocol of the FedOBP paper (see the fedobp algorithm's docstring and its spec).
    "fedobp": {
        "datasets": ["cifar10"], "alphas": [0.1, 0.5], "seeds": [42],
        "clients": 100, "join_ratio": 0.1, "rounds": 400, "local_epochs": 5, "batch_size": 32,
        "lr": 0.01, "momentum": 0.7, "model": "fedavgcnn", "test_ratio": 0.25, "min_samples": 10,
        "eval_every": 100,
    },
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])

"""Every committed grid file is a valid sweep configuration: its algorithms and hyperparameters
exist and its values type-check (a typo in a grid would otherwise surface hours into a sweep)."""

from pathlib import Path

import pytest

from pflbench.core.registry import get_algorithm, load_algorithms, resolve_hyperparams
from pflbench.experiments.sweep import build_plan

GRIDS = sorted((Path(__file__).resolve().parents[1] / "grids").glob("*.toml"))


@pytest.mark.parametrize("grid", GRIDS, ids=[g.stem for g in GRIDS])
def test_grid_resolves_to_run_configs(grid):
    load_algorithms()
    plan = build_plan(None, grid, {}, [])
    configs = plan.configs()
    assert configs
    for config in configs:
        resolve_hyperparams(get_algorithm(config.algo), config.hp)


def test_the_authors_fedobp_grid_reaches_their_configuration():
    load_algorithms()
    plan = build_plan(None, GRIDS[0].with_name("fedobp-authors.toml"), {}, [])
    (config, *_) = plan.configs()
    assert config.algo == "fedobp"
    assert {k: config.hp[k] for k in ("score", "ema", "first")} == {"score": "abs_prod", "ema": 0.5, "first": "init"}

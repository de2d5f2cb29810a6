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


def test_the_finetune_grid_is_the_fmnist_grid_with_fine_tuning():
    load_algorithms()
    base = build_plan(None, GRIDS[0].with_name("fmnist.toml"), {}, [])
    tuned = build_plan(None, GRIDS[0].with_name("fmnist-finetune.toml"), {}, [])
    assert tuned.settings == {**base.settings, "finetune_epochs": 1}
    assert (tuned.datasets, tuned.alphas, tuned.seeds) == (base.datasets, base.alphas, base.seeds)
    by_algo = {c.algo: c for c in tuned.configs()}
    assert by_algo["scaffold"].hp["cv_lr"] == "effective"
    assert {"fedavg", "scaffold", "moon", "feddyn"} <= set(by_algo)


@pytest.mark.parametrize("grid", GRIDS, ids=[g.stem for g in GRIDS])
def test_grid_search_tables_resolve_to_studies(grid):
    from pflbench.core.search import Fixed
    from pflbench.experiments.tuning import study_specs

    load_algorithms()
    specs = study_specs(build_plan(None, grid, {}, []), (1000,), 0.1)
    for spec in specs:
        searched = [k for k, v in spec.spaces.items() if not isinstance(v, Fixed)]
        assert len(spec.default_params()) == len(searched)  # the defaults can be enqueued as trial 0
        assert all(c.val_ratio == 0.1 for c in spec.configs({}))


def test_the_fedobp_q_grid_searches_q_alone():
    from pflbench.core.search import Fixed, NearOne
    from pflbench.experiments.tuning import study_specs

    load_algorithms()
    (a01, a05) = study_specs(build_plan(None, GRIDS[0].with_name("fedobp-q.toml"), {}, []), (1000,), 0.1)
    assert a01.spaces["q"] == NearOne(0.999, 0.99999)
    assert [k for k, v in a01.spaces.items() if not isinstance(v, Fixed)] == ["q"]
    assert a01.configs({"q": 0.9995, "lr": 0.01})[0].lr == 0.01

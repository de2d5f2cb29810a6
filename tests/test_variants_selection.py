"""Variants of FedDPA (quantile mask), LG-FedAvg (which layers are global, FedAvg warm-up) and
Floco (FL-bench's tau and rho): each variant's defining property, exactly."""

import math

import pytest
import torch

from helpers import comm_bytes, finite_accuracy, make_engine, metrics, small_config, states_equal
from pflbench.errors import UserError
from pflbench.core.state import min_max, nbytes, subset, weighted_mean


# -- FedDPA: mask=quantile ------------------------------------------------------------------------
def test_feddpa_quantile_mask_makes_sixty_percent_of_every_tensor_personal():
    engine = make_engine(small_config(algo="feddpa", rounds=1, join_ratio=0.5), mask="quantile",
                         fisher_threshold=0.4, schedule="flbench")
    engine.run()
    algo, g = engine.algo, engine.global_state
    cid = engine.schedule[0][0]
    local = algo.kept[cid]  # a trained model, so a real Fisher
    fisher = algo.fisher(cid, local)
    mask = algo.personal_mask(cid, local)
    assert set(mask) == set(g)
    for n, m in mask.items():
        size = m.numel()
        count = int(m.sum())
        assert abs(count - 0.6 * size) <= 1, n
        assert count == size - 1 - math.floor(0.4 * (size - 1)), n  # no tie at the threshold here
        f = min_max(fisher[n])
        assert torch.equal(m, f > torch.quantile(f, 0.4))  # the FedOBP fork's rule, strict >
        assert not torch.equal(m, f > 0.4)  # not the value rule
    merged = algo.eval_state(cid, g)
    for n, m in mask.items():
        assert torch.equal(merged[n], torch.where(m, local[n], g[n]))


def test_feddpa_value_mask_is_still_the_default_and_thresholds_the_value():
    engine = make_engine(small_config(algo="feddpa", rounds=1))
    engine.run()
    algo = engine.algo
    assert algo.hp.mask == "value"
    fisher = algo.fisher(0, algo.kept[0])
    mask = algo.personal_mask(0, algo.kept[0])
    assert all(torch.equal(m, min_max(fisher[n]) > 0.4) for n, m in mask.items())


def test_feddpa_fork_baseline_personalizes_sixty_percent_at_every_start():
    # schedule=flbench, mask=quantile, first=init: the FedOBP fork's FedDPA baseline
    engine = make_engine(small_config(algo="feddpa", rounds=2, join_ratio=0.5), schedule="flbench",
                         mask="quantile", first="init", fisher_threshold=0.4)
    result = engine.run()
    assert finite_accuracy(result)
    total, tensors = engine.algo.total, len(engine.global_state)
    assert abs(result.summary["personalized_fraction"] - 0.6) <= tensors / total
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert "quantile threshold 0.4" in result.summary["eval_adapt"]


def test_feddpa_quantile_mask_at_one_and_no_shared_regularizer_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=2)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    feddpa = make_engine(config.replace(algo="feddpa"), mask="quantile", fisher_threshold=1.0, lam2=0.0).run()
    assert metrics(feddpa) == metrics(fedavg)
    assert feddpa.summary["personalized_fraction"] == 0.0


def test_feddpa_quantile_threshold_ties_extremes_and_tensors_over_two_to_the_24():
    from algorithms.feddpa import above_quantile

    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    for q in (0.0, 0.3, 0.4, 0.5, 0.75, 1.0):  # ties at the threshold stay shared, as in the fork
        assert torch.equal(above_quantile(x, q), x > torch.quantile(x, q)), q
    assert int(above_quantile(x, 0.3).sum()) == 6  # r = 2 is tied with 0s up to rank 3
    assert not above_quantile(x, 1.0).any()
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 200, 40000):
        for q in (0.0, 0.1, 0.4, 0.7, 0.99, 1.0):
            v = torch.randn(n, generator=gen).reshape(-1, 1)
            assert torch.equal(above_quantile(v, q), v > torch.quantile(v.flatten(), q)), (n, q)
    n = (1 << 24) + 3  # torch.quantile refuses this size in older torch; order statistics do not
    big = torch.arange(n) * 7919 % n  # a permutation of 0..n-1 (7919 is prime to n)
    r = math.floor(0.4 * (n - 1))
    assert torch.equal(above_quantile(big, 0.4), big > r)


def test_feddpa_quantile_mask_counts_the_fisher_in_grad_evals():
    engine = make_engine(small_config(algo="feddpa", rounds=2, join_ratio=1.0, eval_every=1), mask="quantile")
    summary = engine.run().summary
    n_all = sum(c.n_train for c in engine.clients)
    # round 1: no local model, the shared phase only; round 2: Fisher, personal and shared phases
    assert summary["grad_evals"] == n_all + 3 * n_all
    assert summary["eval_grad_evals"] == 2 * n_all  # one Fisher per client per evaluation


def test_feddpa_quantile_mask_needs_a_threshold_in_the_unit_interval():
    from algorithms.feddpa import FedDPA

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fisher_threshold"):
            FedDPA.Hyperparams(mask="quantile", fisher_threshold=bad)
    FedDPA.Hyperparams(mask="value", fisher_threshold=1.5)  # the value rule takes any threshold


# -- LG-FedAvg: which layers are global, warm-up --------------------------------------------------
def _record_uploads(algo):
    uploads = []
    original = algo.aggregate
    algo.aggregate = lambda ups, g: uploads.extend(ups) or original(ups, g)
    return uploads


def test_lgfedavg_flbench_split_shares_exactly_the_first_layer():
    engine = make_engine(small_config(algo="lgfedavg", rounds=2, join_ratio=0.5), global_layers="first")
    algo = engine.algo
    first = ("body.1.weight", "body.1.bias")  # the MLP's first Linear
    assert algo.shared_keys == first
    assert set(algo.personal_keys) == set(engine.global_state) - set(first)
    init = {k: v.clone() for k, v in engine.global_state.items()}
    uploads = _record_uploads(algo)
    result = engine.run()
    g = engine.global_state
    layer = nbytes(subset(g, first))
    assert comm_bytes(result) == (2 * 3 * layer, 2 * 3 * layer)
    assert all(tuple(u.payload) == first for u in uploads)
    last_round = uploads[-3:]
    expected = weighted_mean([u.payload for u in last_round], [u.n_train for u in last_round])
    assert states_equal(subset(g, first), expected)
    assert states_equal(subset(g, algo.personal_keys), subset(init, algo.personal_keys))
    for cid in algo.kept:
        assert set(algo.kept[cid]) == set(algo.personal_keys)
        assert states_equal(algo.eval_state(cid, g), {**g, **algo.kept[cid]})


def test_lgfedavg_last_n_layers_shares_exactly_those():
    engine = make_engine(small_config(algo="lgfedavg", rounds=2, join_ratio=0.5),
                         global_layers="last", num_global=2)
    algo = engine.algo
    last_two = ("body.3.weight", "body.3.bias", "head.weight", "head.bias")
    assert algo.shared_keys == last_two
    uploads = _record_uploads(algo)
    result = engine.run()
    size = nbytes(subset(engine.global_state, last_two))
    assert comm_bytes(result) == (2 * 3 * size, 2 * 3 * size)
    assert all(tuple(u.payload) == last_two for u in uploads)


def test_lgfedavg_last_layer_is_the_head_and_all_layers_global_is_fedavg():
    config = small_config(algo="lgfedavg", rounds=2, join_ratio=0.5)
    head = make_engine(config).run()
    last = make_engine(config, global_layers="last", num_global=1).run()
    assert metrics(last) == metrics(head)
    everything = make_engine(config, global_layers="first", num_global=3).run()
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    assert metrics(everything) == metrics(fedavg)
    with pytest.raises(UserError, match="num_global=4"):
        make_engine(config, global_layers="first", num_global=4)
    with pytest.raises(UserError, match="num_global applies to global_layers=first or last"):
        make_engine(config, num_global=2)  # head takes no count


def test_lgfedavg_warmup_rounds_are_exactly_fedavg():
    config = small_config(rounds=3, join_ratio=0.5)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    for split in ("head", "first"):
        engine = make_engine(config.replace(algo="lgfedavg"), global_layers=split, warmup_rounds=3)
        warm = engine.run()
        assert metrics(warm) == metrics(fedavg)  # bytes included: the whole model both ways
        assert not engine.algo.kept  # nothing personal during the warm-up


def test_lgfedavg_after_warmup_personal_layers_start_from_the_warmup_model():
    config = small_config(algo="lgfedavg", rounds=4, join_ratio=0.5)
    fedavg = make_engine(config.replace(algo="fedavg", rounds=2)).run()
    engine = make_engine(config, global_layers="first", warmup_rounds=2)
    algo = engine.algo
    after = {}
    starts = []
    original = algo.client_start

    def spy(cid, g):
        state = original(cid, g)
        starts.append((cid, len(after), state))
        return state

    algo.client_start = spy
    result = engine.run(progress=lambda r, _: after.setdefault(r, {k: v.clone() for k, v in engine.global_state.items()}))
    rounds, clients = metrics(result)
    fed_rounds, fed_clients = metrics(fedavg)
    assert rounds[:2] == fed_rounds and [c for c in clients if c["round"] <= 2] == fed_clients
    warm_model = after[2]
    seen = set()
    for cid, done, state in starts:
        if done >= 2 and cid not in seen:  # a client's first LG round: its personal layers start
            seen.add(cid)                  # from the warm-up's model
            assert states_equal(subset(state, algo.personal_keys), subset(warm_model, algo.personal_keys))
    assert states_equal(subset(engine.global_state, algo.personal_keys), subset(warm_model, algo.personal_keys))
    full = nbytes(engine.global_state)
    shared = nbytes(subset(engine.global_state, algo.shared_keys))
    first_lg = set()
    down = 2 * 3 * full
    for sampled in engine.schedule[2:]:
        for cid in sampled:
            down += shared if cid in first_lg else full
            first_lg.add(cid)
    assert comm_bytes(result) == (2 * 3 * full + 2 * 3 * shared, down)


# -- Floco: FL-bench's tau and rho ---------------------------------------------------------------
def test_floco_defaults_are_flbench_and_the_assignment_happens_exactly_at_round_tau():
    from algorithms.floco import Floco

    hp = Floco.Hyperparams()
    assert (hp.tau, hp.rho, hp.endpoints) == (10, 0.1, 10)
    engine = make_engine(small_config(algo="floco", rounds=12, join_ratio=0.5, eval_every=12))
    algo = engine.algo
    assigned = []
    used = []
    original = algo.alphas
    algo.alphas = lambda cid, r, n, whole=False: used.append((cid, r, a := original(cid, r, n, whole))) or a
    result = engine.run(progress=lambda r, _: assigned.append(algo.centers is not None))
    assert assigned == [False] * 9 + [True] * 3  # set by round 10's aggregation, not before
    assert result.summary["floco_tau"] == 10 and result.summary["floco_assigned"] == 1
    for cid, r, a in used:
        if r > 10:
            assert float((a - algo.centers[cid]).abs().sum(1).max()) <= 0.1 * (1 + 1e-9)


def test_floco_with_tau_at_or_beyond_the_rounds_runs_without_assignment():
    config = small_config(algo="floco", rounds=3, join_ratio=0.5)
    for tau in (10, 3):  # the default tau beyond a short run, and tau equal to the rounds
        engine = make_engine(config, tau=tau)
        result = engine.run()
        assert engine.algo.centers is None and result.summary["floco_assigned"] == 0
        assert finite_accuracy(result)
        full = nbytes(engine.global_state)
        assert comm_bytes(result) == (3 * 3 * full, 3 * 3 * full)  # no assignment traffic
    half = make_engine(small_config(algo="floco", rounds=4, join_ratio=0.5), tau=-1)
    summary = half.run().summary
    assert summary["floco_tau"] == 2 and summary["floco_assigned"] == 1

"""FedOBP's server-side element merge, checked against hand-built states."""

import torch

from helpers import make_engine, small_config, states_equal
from pflbench.core.state import subset


def fedobp(**hp):
    engine = make_engine(small_config(algo="fedobp"), **hp)
    g = {k: torch.zeros_like(v) for k, v in engine.global_state.items()}
    return engine.algo, g


def flat(state, keys):
    return torch.cat([state[k].flatten() for k in keys])


def test_the_k_largest_squared_differences_keep_the_clients_values():
    algo, g = fedobp(q=0.999)
    torch.manual_seed(0)
    last = {k: torch.randn_like(v) for k, v in g.items()}
    algo.last[0] = last
    merged = algo.client_start(0, g)
    values, kept_last = flat(last, algo.all_keys), flat(merged, algo.all_keys) != 0
    assert int(kept_last.sum()) == algo.k == round(0.001 * values.numel())
    threshold = values.square().topk(algo.k).values.min()
    assert torch.equal(kept_last, values.square() >= threshold)
    assert torch.equal(flat(merged, algo.all_keys)[kept_last], values[kept_last])


def test_abs_prod_score_ranks_by_change_times_value():
    algo, g = fedobp(q=0.999, score="abs_prod")
    torch.manual_seed(1)
    g = {k: torch.randn_like(v) for k, v in g.items()}
    last = {k: torch.randn_like(v) for k, v in g.items()}
    algo.last[0] = last
    merged = algo.client_start(0, g)
    score = ((flat(last, algo.all_keys) - flat(g, algo.all_keys)) * flat(last, algo.all_keys)).abs()
    chosen = flat(merged, algo.all_keys) == flat(last, algo.all_keys)
    assert torch.equal(chosen, score >= score.topk(algo.k).values.min())


def test_ties_are_broken_by_element_order_and_equal_scores_do_not_divide_by_zero():
    algo, g = fedobp(q=0.999)
    algo.last[0] = {k: torch.ones_like(v) for k, v in g.items()}
    merged = algo.client_start(0, g)
    chosen = flat(merged, algo.all_keys)
    assert not torch.isnan(chosen).any()
    assert torch.equal(chosen.nonzero().flatten(), torch.arange(algo.k))
    assert states_equal(merged, algo.client_start(0, g))


def test_eligible_head_never_personalizes_the_body():
    algo, g = fedobp(q=0.5, eligible="head")
    algo.last[0] = {k: torch.randn_like(v) * (100 if k in algo.body_keys else 1) for k, v in g.items()}
    merged = algo.client_start(0, g)
    assert states_equal(subset(merged, algo.body_keys), subset(g, algo.body_keys))
    head_kept = int((flat(merged, algo.head_keys) != 0).sum())
    assert head_kept == algo.k == round(0.5 * flat(g, algo.head_keys).numel())


def test_layer_normalization_gives_every_tensor_a_chance():
    algo, g = fedobp(q=0.9, norm="layer")
    last = {k: torch.rand_like(v) * (1000.0 if k == algo.all_keys[0] else 1.0) for k, v in g.items()}
    algo.last[0] = last
    merged = algo.client_start(0, g)
    assert any(bool((merged[k] != 0).any()) for k in algo.all_keys[1:])
    algo_global, _ = fedobp(q=0.9, norm="global")
    algo_global.last[0] = last
    merged_global = algo_global.client_start(0, g)
    assert not any(bool((merged_global[k] != 0).any()) for k in algo.all_keys[1:])


def test_ema_smooths_scores_and_evaluation_does_not_advance_it():
    algo, g = fedobp(q=0.99, ema=0.5)
    algo.last[0] = {k: torch.randn_like(v) for k, v in g.items()}
    algo.client_start(0, g)
    first = {k: v.clone() for k, v in algo.smoothed[0].items()}
    g2 = {k: torch.randn_like(v) for k, v in g.items()}
    algo.eval_state(0, g2)
    assert states_equal(algo.smoothed[0], first)
    algo.client_start(0, g2)
    fresh = {k: (algo.last[0][k] - g2[k]).square() for k in g2}
    expected = {k: 0.5 * fresh[k] + 0.5 * first[k] for k in g2}
    assert all(torch.allclose(algo.smoothed[0][k], expected[k]) for k in g2)


def test_first_participation_uses_the_global_model_or_the_authors_init():
    algo, g = fedobp(q=0.99)
    assert algo.client_start(0, g) is g
    algo_init, _ = fedobp(q=0.99, first="init")
    init = {k: torch.randn_like(v) for k, v in g.items()}
    algo_init.client_start(0, init)  # the server's first call sees the initial model
    merged = algo_init.client_start(1, g)
    reverted = flat(merged, algo_init.all_keys) != 0
    assert int(reverted.sum()) == algo_init.k
    assert torch.equal(flat(merged, algo_init.all_keys)[reverted], flat(init, algo_init.all_keys)[reverted])


def test_linear_time_top_k_equals_the_stable_sort_with_ties_by_element_order():
    from algorithms.fedobp import top_k_mask

    gen = torch.Generator().manual_seed(3)
    for n, levels in [(1000, 4), (1000, 1000000), (257, 1), (50000, 7)]:
        scores = torch.randint(0, levels, (n,), generator=gen).float()  # few levels: many ties
        order = torch.sort(scores, descending=True, stable=True).indices
        for k in (0, 1, 2, n // 3, n // 2 + 1, n - 1, n):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(top_k_mask(scores, k), expected), (n, levels, k)

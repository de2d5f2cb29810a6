"""Parameter-selection family (FedDPA, FedSelect, Floco): each one's defining property, exactly."""

import math

import torch

from helpers import comm_bytes, finite_accuracy, make_engine, metrics, small_config, states_equal
from pflbench.core.algorithm import Upload
from pflbench.core.masked import train_elements
from pflbench.core.state import get_state, nbytes


# -- shared helper: training a subset of elements -------------------------------------------------
def test_frozen_elements_do_not_move_under_momentum_and_weight_decay():
    engine = make_engine(small_config(algo="feddpa", momentum=0.9, weight_decay=0.1))
    model = engine.model
    before = get_state(model)
    gen = torch.Generator().manual_seed(0)
    trainable = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters()}
    trainable["head.bias"][:] = False  # a tensor wholly frozen
    train_elements(engine.trainer, model, 0, 2, 1, trainable)
    after = get_state(model)
    for n, m in trainable.items():
        assert torch.equal(after[n][~m], before[n][~m])
        assert not torch.equal(after[n][m], before[n][m]) or not m.any()


# -- FedDPA ---------------------------------------------------------------------------------------
def test_feddpa_with_threshold_one_and_no_shared_regularizer_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    feddpa = make_engine(config.replace(algo="feddpa"), fisher_threshold=1.0, lam2=0.0).run()
    assert metrics(feddpa) == metrics(fedavg)
    assert comm_bytes(feddpa) == comm_bytes(fedavg)
    assert feddpa.summary["personalized_fraction"] == 0.0


def test_feddpa_threshold_extremes_give_global_or_own_model():
    engine = make_engine(small_config(algo="feddpa", rounds=2), fisher_threshold=-0.5)
    engine.run()
    algo, g = engine.algo, engine.global_state
    for cid in range(6):  # everyone joined: negative threshold -> every element is personal
        assert states_equal(algo.eval_state(cid, g), algo.kept[cid])
    algo.hp.fisher_threshold = 1.0  # above every normalized value -> nothing is personal
    for cid in range(6):
        assert states_equal(algo.eval_state(cid, g), g)
    algo.hp.fisher_threshold = 0.4
    mask = algo.personal_mask(0, algo.kept[0])
    merged = algo.eval_state(0, g)
    for n, m in mask.items():
        assert torch.equal(merged[n], torch.where(m, algo.kept[0][n], g[n]))
    share = sum(int(m.sum()) for m in mask.values()) / algo.total
    assert 0 < share < 1
    assert states_equal(algo.eval_state(0, g), merged)  # evaluation is deterministic


def test_feddpa_fisher_is_the_mean_squared_per_sample_gradient():
    engine = make_engine(small_config(algo="feddpa"))
    algo, model = engine.algo, engine.model
    state = get_state(model)
    data, idx = engine.trainer.data, engine.clients[1].train[:5]
    # on 5 samples, against an explicit per-sample loop
    algo.ctx.clients[1].train, full = idx, algo.ctx.clients[1].train
    try:
        fisher = algo.fisher(1, state)
    finally:
        algo.ctx.clients[1].train = full
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in idx:
        model.zero_grad()
        logp = torch.log_softmax(model(data.x[i:i + 1]), 1)[0, data.y[i]]
        logp.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() / len(idx)
    for n in expected:  # vmap and the loop sum in different orders: float tolerance
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-9)


def test_feddpa_sends_the_whole_model_both_ways_and_runs():
    engine = make_engine(small_config(algo="feddpa", rounds=2, join_ratio=0.5))
    result = engine.run()
    full = nbytes(engine.global_state)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)
    assert finite_accuracy(result)
    assert 0 < result.summary["personalized_fraction"] < 1


# -- FedSelect ------------------------------------------------------------------------------------
def test_fedselect_without_growth_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    fedselect = make_engine(config.replace(algo="fedselect"), p=0.0).run()
    assert metrics(fedselect) == metrics(fedavg)
    assert comm_bytes(fedselect) == comm_bytes(fedavg)


def test_fedselect_masks_grow_monotonically_on_schedule_and_bytes_are_exact():
    p, cap = 0.3, 0.5
    engine = make_engine(small_config(algo="fedselect", rounds=4), p=p, max_personal=cap, grow_every=1)
    algo = engine.algo
    numel = {k: v.numel() for k, v in engine.global_state.items()}
    history = []
    result = engine.run(progress=lambda r, _: history.append({c: dict(m) for c, m in algo.masks.items()}))
    total = sum(numel.values())
    expected_up = 0
    count = {c: {k: 0 for k in algo.eligible} for c in range(6)}
    previous = {c: {} for c in range(6)}
    for masks in history:  # every client joins every round
        for c in range(6):
            expected_up += 4 * (total - sum(count[c].values()))
            for k in algo.eligible:
                n = numel[k]
                count[c][k] = min(math.floor(cap * n), count[c][k] + int(round(p * (n - count[c][k]))))
                assert int(masks[c][k].sum()) == count[c][k]
                if k in previous[c]:
                    assert bool((previous[c][k] <= masks[c][k]).all())  # monotone
            assert set(masks[c]) == set(algo.eligible)
            previous[c] = masks[c]
    assert count[0]["body.1.weight"] == math.floor(cap * numel["body.1.weight"])  # the cap is reached
    assert comm_bytes(result) == (expected_up, 4 * 6 * nbytes(engine.global_state))
    assert finite_accuracy(result)
    g = engine.global_state
    for c in range(6):  # evaluation: personal values where the mask says, global elsewhere
        state = algo.eval_state(c, g)
        for k, m in algo.masks[c].items():
            assert torch.equal(state[k][~m], g[k][~m]) and torch.equal(state[k][m], algo.kept[c][k])


def test_fedselect_averages_each_element_over_the_clients_sharing_it():
    engine = make_engine(small_config(algo="fedselect"))
    algo, g = engine.algo, engine.global_state
    key = "body.1.weight"
    gen = torch.Generator().manual_seed(1)
    trained = [{k: v + torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in range(3)]
    masks = [torch.rand(g[key].shape, generator=gen) < 0.5 for _ in range(3)]
    masks[2] = torch.ones_like(masks[2])  # client 2 keeps this tensor personal in full
    uploads = []
    for cid, (state, m) in enumerate(zip(trained, masks)):
        algo.masks[cid] = {key: m}
        algo.kept[cid] = {key: state[key][m]}
        algo.round_global = g
        uploads.append(Upload(cid, 10 * (cid + 1), algo.upload(cid, state)))
    assert key not in uploads[2].payload
    assert uploads[0].payload[key].numel() == int((~masks[0]).sum())
    new = algo.aggregate(uploads, g)
    w0, w1 = 10.0, 20.0
    s0, s1 = ~masks[0], ~masks[1]
    both = s0 & s1
    expected = (w0 * trained[0][key].double() + w1 * trained[1][key].double()) / (w0 + w1)
    torch.testing.assert_close(new[key][both], expected[both].float())
    assert torch.equal(new[key][s0 & ~s1], trained[0][key][s0 & ~s1])
    assert torch.equal(new[key][~s0 & s1], trained[1][key][~s0 & s1])
    assert torch.equal(new[key][~s0 & ~s1], g[key][~s0 & ~s1])  # personal for every uploader


# -- Floco ----------------------------------------------------------------------------------------
def test_floco_with_one_endpoint_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    floco = make_engine(config.replace(algo="floco"), endpoints=1, tau=1).run()
    assert metrics(floco) == metrics(fedavg)
    assert comm_bytes(floco) == comm_bytes(fedavg)


def test_floco_subregion_samples_lie_in_the_simplex_and_the_ball():
    from algorithms.floco import sample_subregion

    gen = torch.Generator().manual_seed(0)
    rho = 0.3
    for center in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0, 0.0], [0.5, 0.492, 1e-3, 0.0, 7e-3], [0.6, 0.4]):
        c = torch.tensor(center, dtype=torch.float64)
        a = sample_subregion(c, rho, 4000, gen)
        assert a.shape == (4000, len(center))
        assert bool((a >= 0).all())
        torch.testing.assert_close(a.sum(1), torch.ones(4000, dtype=torch.float64), rtol=0, atol=1e-12)
        assert float((a - c).abs().sum(1).max()) <= rho * (1 + 1e-9)
    # uniform: in the interior the volume within radius r grows as r^(M-1): a quarter within rho/2 (M=3)
    c = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    a = sample_subregion(c, 0.2, 20000, gen)
    inner = float(((a - c).abs().sum(1) <= 0.1).double().mean())
    assert abs(inner - 0.25) < 0.02  # Monte Carlo: 20000 draws, std ~0.003


def test_floco_trains_in_the_assigned_subregions_and_counts_every_byte():
    m, rho = 3, 0.2
    engine = make_engine(small_config(algo="floco", rounds=3, join_ratio=0.5), endpoints=m, rho=rho, tau=1)
    algo = engine.algo
    used = []
    original = algo.alphas
    algo.alphas = lambda cid, r, n, whole=False: used.append((cid, r, a := original(cid, r, n, whole))) or a
    result = engine.run()
    assert algo.centers is not None and algo.centers.shape == (6, m)
    torch.testing.assert_close(algo.centers.sum(1), torch.ones(6, dtype=torch.float64))
    assert bool((algo.centers >= 0).all())
    assert len({tuple(c) for c in algo.centers.tolist()}) > 1  # the clients are spread out
    for cid, r, a in used:
        torch.testing.assert_close(a.sum(1), torch.ones(len(a), dtype=torch.float64))
        assert bool((a >= 0).all())
        if r > 1:  # after the assignment (end of round 1): within the client's subregion
            assert float((a - algo.centers[cid]).abs().sum(1).max()) <= rho * (1 + 1e-9)
    g = engine.global_state
    assert set(g) == {*algo.body_keys, "head.endpoints", "head.bias"}
    assert g["head.endpoints"].shape[0] == m
    model_bytes, endpoint_bytes = nbytes(g), nbytes({"e": g["head.endpoints"]})
    # 3 rounds of 3 sampled clients, plus the assignment after round 1: the 3 clients not sampled
    # download the model and upload their endpoints once
    assert comm_bytes(result) == (9 * model_bytes + 3 * endpoint_bytes, 9 * model_bytes + 3 * model_bytes)
    assert finite_accuracy(result)
    # evaluation at the client's center, read-only
    net = algo.eval_model(2, g)
    assert torch.equal(net.head.alpha, algo.centers[2].float())
    x = engine.trainer.data.x[engine.clients[2].test]
    w = torch.einsum("m,mcd->cd", algo.centers[2].float(), g["head.endpoints"])
    torch.testing.assert_close(net(x), torch.nn.functional.linear(net.body(x), w, g["head.bias"]))


def test_floco_center_projection_spreads_clients_on_the_simplex():
    from algorithms.floco import MIN_ACCEPTANCE, acceptance, assign_centers, project_simplex, snap_center

    v = torch.tensor([[0.5, 0.2, 0.9], [-1.0, 2.0, 0.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    p = project_simplex(v)
    torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(p[1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    signals = torch.randn(8, 50, generator=gen, dtype=torch.float64)
    centers = assign_centers(signals, 4)
    assert centers.shape == (8, 4)
    assert bool((centers >= 0).all())
    torch.testing.assert_close(centers.sum(1), torch.ones(8, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    plain = torch.tensor([0.2, 0.5, 0.0, 0.3], dtype=torch.float64)
    assert torch.equal(snap_center(plain, 0.1, gen), plain)  # a sampler-friendly center is kept
    tiny = torch.tensor([0.5, 0.5 - 8e-6] + [1e-6] * 8, dtype=torch.float64)
    assert acceptance(tiny, 0.1, gen) < MIN_ACCEPTANCE
    snapped = snap_center(tiny, 0.1, gen)
    assert acceptance(snapped, 0.1, gen) >= MIN_ACCEPTANCE
    assert float((snapped - tiny).abs().sum()) < 1e-4 and abs(float(snapped.sum()) - 1) < 1e-12

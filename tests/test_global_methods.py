"""The global drift-correcting methods kept as reference points for the personalized ones: SCAFFOLD
(control variates) and FedDyn (dynamic regularization). Each one's defining arithmetic, checked
exactly where it allows, its exact communication, determinism and hyperparameter validation."""

import math

import pytest
import torch

from algorithms.fedavg import FedAvg
from helpers import comm_bytes, digits, digits16, make_engine, metrics, small_config, states_equal
from pflbench.core.algorithm import Upload
from pflbench.core.engine import Engine
from pflbench.core.partition import partition
from pflbench.core.state import nbytes, set_state
from pflbench.core.training import cross_entropy
from pflbench.errors import UserError
from pflbench.experiments.runner import partition_spec


def spy(algo, extra=lambda cid: {}):
    """Record, per client update: (cid, received global state, what `extra` says at the start,
    the trained state, the algorithm's own record right after the upload)."""
    seen, start, upload = [], algo.client_start, algo.upload
    at_start = {}

    def client_start(cid, g):
        at_start[cid] = ({k: v.clone() for k, v in g.items()}, extra(cid))
        return start(cid, g)

    def spy_upload(cid, trained):
        trained_copy = {k: v.clone() for k, v in trained.items()}
        out = upload(cid, trained)
        seen.append((cid, *at_start[cid], trained_copy))
        return out

    algo.client_start, algo.upload = client_start, spy_upload
    return seen


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def model_bytes(engine):
    return nbytes(engine.global_state)


def constant_state(like, value):
    return {k: torch.full_like(v, value) for k, v in like.items()}


def run_with_engine(cls, config, hp):
    splits = partition(digits().y.numpy(), partition_spec(config))
    return Engine(config, digits(), splits, cls, hp, torch.device("cpu"))


# == SCAFFOLD ======================================================================================

def test_scaffold_round1_with_samples_weighting_is_exactly_fedavg():
    config = small_config(rounds=1, join_ratio=0.5)
    fedavg = make_engine(config.replace(algo="fedavg"))
    scaffold = make_engine(config.replace(algo="scaffold"), weighting="samples", global_lr=1.0)
    a, b = fedavg.run(), scaffold.run()
    assert metrics(b, with_comm=False) == metrics(a, with_comm=False)
    assert states_equal(scaffold.global_state, fedavg.global_state)


def test_scaffold_round1_by_default_is_exactly_fedavg_with_uniform_weights():
    class UniformFedAvg(FedAvg):
        def aggregation_weight(self, cid, n_train):
            return 1.0

    config = small_config(rounds=1, join_ratio=0.5, algo="fedavg")
    uniform = run_with_engine(UniformFedAvg, config, FedAvg.Hyperparams())
    scaffold = make_engine(config.replace(algo="scaffold"))
    samples = make_engine(config.replace(algo="fedavg"))
    for engine in (uniform, scaffold, samples):
        engine.run()
    assert states_equal(scaffold.global_state, uniform.global_state)
    assert not states_equal(scaffold.global_state, samples.global_state)  # the weighting matters here


def test_scaffold_corrects_from_round2_on_and_momentum_carries_the_correction():
    config = small_config(rounds=2, join_ratio=0.5)
    fedavg = make_engine(config.replace(algo="fedavg"))
    scaffold = make_engine(config.replace(algo="scaffold"), weighting="samples")
    fedavg.run(), scaffold.run()
    assert any(float(v.abs().max()) > 0 for v in scaffold.algo.c.values())
    assert not states_equal(scaffold.global_state, fedavg.global_state)


def test_scaffold_local_step_is_x_minus_lr_times_corrected_gradient():
    lr = 0.05
    engine = make_engine(small_config(algo="scaffold", batch_size=10_000, lr=lr, momentum=0.9))
    algo, model, g = engine.algo, engine.model, engine.global_state
    gen = torch.Generator().manual_seed(3)
    algo.c = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in algo.c.items()}
    c_i = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in algo.c.items()}
    algo.c_local[2] = clone(c_i)
    x, y = next(iter(engine.trainer.batches(2, 1, 1)))  # the one full batch, round 1's order
    set_state(model, g)
    model.zero_grad()
    cross_entropy(model, x, y).backward()
    expected = {n: g[n] - lr * (p.grad + algo.c[n] - c_i[n]) for n, p in model.named_parameters()}

    set_state(model, algo.client_start(2, g))
    algo.local_train(2, model, 1)  # one epoch of one batch: K = 1 (the first momentum step is the gradient)
    assert algo.steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)


def test_scaffold_option2_control_variate_with_k_the_steps_taken():
    config = small_config(algo="scaffold", rounds=3, join_ratio=0.5, local_epochs=2, batch_size=16)
    engine = make_engine(config)
    algo = engine.algo
    seen = spy(algo, lambda cid: (clone(algo.c), clone(algo.control(cid))))
    records = []
    original = algo.upload

    def upload(cid, trained):
        out = original(cid, trained)
        records.append((cid, clone(algo.c_local[cid]),
                        {k[len("scaffold.delta_c:"):]: v.clone() for k, v in out.items() if k.startswith("scaffold.")}))
        return out

    algo.upload = upload
    engine.run()
    assert len(seen) == 9
    for (cid, x, (c, c_old), y), (cid2, c_new, delta_c) in zip(seen, records):
        assert cid == cid2
        k = 2 * math.ceil(engine.clients[cid].n_train / 16)
        for n in c:
            option2 = c_old[n] - c[n] + (x[n] - y[n]) / (k * config.lr)
            torch.testing.assert_close(c_new[n], option2, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(delta_c[n], c_new[n] - c_old[n], rtol=1e-4, atol=1e-6)


def test_scaffold_effective_cv_lr_scales_the_first_control_variates_by_one_minus_momentum():
    """Round 1 trains the same with either choice (every control variate is zero), so c_i under
    `cv_lr=effective` is (1 - beta) times c_i under the references' `lr`; without momentum the two
    runs are identical throughout."""
    beta = 0.7
    config = small_config(algo="scaffold", rounds=1, momentum=beta)
    plain, effective = make_engine(config), make_engine(config, cv_lr="effective")
    plain.run(), effective.run()
    assert plain.algo.c_local.keys() == effective.algo.c_local.keys()
    for cid, c_i in plain.algo.c_local.items():
        for n, v in c_i.items():
            torch.testing.assert_close(effective.algo.c_local[cid][n], (1 - beta) * v, rtol=1e-5, atol=1e-7)
    assert any(float(v.abs().max()) > 0 for c_i in plain.algo.c_local.values() for v in c_i.values())
    no_momentum = small_config(algo="scaffold", rounds=3, join_ratio=0.5)
    a, b = make_engine(no_momentum), make_engine(no_momentum, cv_lr="effective")
    assert metrics(a.run()) == metrics(b.run())
    assert states_equal(a.global_state, b.global_state)


def test_scaffold_server_step_on_a_hand_example():
    engine = make_engine(small_config(algo="scaffold", clients=6), global_lr=0.5)
    algo = engine.algo
    x = constant_state(engine.global_state, 1.0)
    payload = lambda y, dc: {**constant_state(x, y), **{"scaffold.delta_c:" + k: torch.full_like(v, dc)
                                                        for k, v in algo.c.items()}}
    acc = algo.begin_aggregation(x, {0: 10, 1: 30})
    algo.accumulate(acc, Upload(0, 10, payload(3.0, 2.0)))
    algo.accumulate(acc, Upload(1, 30, payload(5.0, 4.0)))
    out = algo.finish_aggregation(acc, x)
    # x + 0.5 * mean(y - x) = 1 + 0.5 * 3 (plain mean); c = (2 + 4) / N, N = 6
    assert all(torch.allclose(v, torch.full_like(v, 2.5)) for v in out.values())
    assert all(torch.allclose(v, torch.ones_like(v)) for v in algo.c.values())

    weighted = make_engine(small_config(algo="scaffold", clients=6), global_lr=0.5, weighting="samples").algo
    acc = weighted.begin_aggregation(x, {0: 10, 1: 30})
    weighted.accumulate(acc, Upload(0, 10, payload(3.0, 2.0)))
    weighted.accumulate(acc, Upload(1, 30, payload(5.0, 4.0)))
    out = weighted.finish_aggregation(acc, x)
    # mean y = (10 * 3 + 30 * 5) / 40 = 4.5, so 1 + 0.5 * 3.5; Delta c is not weighted by samples
    assert all(torch.allclose(v, torch.full_like(v, 2.75)) for v in out.values())
    assert all(torch.allclose(v, torch.ones_like(v)) for v in weighted.c.values())


def test_scaffold_server_c_is_the_mean_of_all_client_control_variates_after_every_round():
    engine = make_engine(small_config(algo="scaffold", rounds=3, join_ratio=0.5, clients=6))
    algo, checked = engine.algo, []

    def check(round_, figures):
        n = len(engine.clients)
        for k, c in algo.c.items():
            mean = sum(algo.control(cid)[k] for cid in range(n)) / n
            torch.testing.assert_close(c, mean, rtol=1e-5, atol=1e-6)
        checked.append(round_)

    engine.run(progress=check)
    assert checked == [1, 2, 3]
    assert any(float(v.abs().max()) > 0 for v in algo.c.values())


def test_scaffold_sends_model_and_control_variate_both_ways():
    engine = make_engine(small_config(algo="scaffold", rounds=2, join_ratio=0.5))
    result = engine.run()
    full = model_bytes(engine)
    assert comm_bytes(result) == (2 * 3 * 2 * full, 2 * 3 * 2 * full)


def test_scaffold_is_deterministic():
    config = small_config(algo="scaffold", rounds=2, join_ratio=0.5)
    assert metrics(make_engine(config).run()) == metrics(make_engine(config).run())


@pytest.mark.parametrize("hp, message", [
    ({"global_lr": 0.0}, "global_lr"), ({"global_lr": -1.0}, "global_lr"), ({"global_lr": math.inf}, "global_lr"),
    ({"weighting": "median"}, "weighting"), ({"cv_lr": "half"}, "cv_lr"),
])
def test_scaffold_rejects_bad_hyperparameters(hp, message):
    with pytest.raises(UserError, match=message):
        make_engine(small_config(algo="scaffold"), **hp)


# == FedDyn ========================================================================================

def test_feddyn_round1_local_training_is_fedprox_with_mu_alpha():
    """With every gradient state zero the local objective is CE + alpha/2 ||theta - theta^0||^2:
    FedProx's with mu = alpha (without clipping), up to the rounding of the other summation order."""
    config = small_config(rounds=1, join_ratio=0.5)
    runs = {}
    for algo, hp in (("feddyn", {"alpha": 0.3, "max_grad_norm": 0.0}), ("fedprox", {"mu": 0.3}),
                     ("fedprox", {"mu": 0.0})):
        engine = make_engine(config.replace(algo=algo), **hp)
        seen = spy(engine.algo)
        engine.run()
        runs[algo, hp.get("mu")] = seen
    for dyn, prox, avg in zip(runs["feddyn", None], runs["fedprox", 0.3], runs["fedprox", 0.0]):
        assert dyn[0] == prox[0] == avg[0]
        torch.testing.assert_close(dyn[3], prox[3], rtol=1e-5, atol=1e-6)
        # the pull is visible at this tolerance: without it (FedAvg's training) the models differ
        assert max(float((dyn[3][k] - avg[3][k]).abs().max()) for k in dyn[3]) > 1e-4


def test_feddyn_local_step_subtracts_the_gradient_state():
    """One full-batch step from theta^{t-1}: the quadratic pull is zero there, so the step is
    -lr (CE gradient - grad_k)."""
    lr = 0.05
    engine = make_engine(small_config(algo="feddyn", batch_size=10_000, lr=lr), alpha=0.5, max_grad_norm=0.0)
    algo, model, g = engine.algo, engine.model, engine.global_state
    gen = torch.Generator().manual_seed(4)
    grad_k = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in algo.h.items()}
    algo.grad_state[1] = clone(grad_k)
    x, y = next(iter(engine.trainer.batches(1, 1, 1)))
    set_state(model, g)
    model.zero_grad()
    cross_entropy(model, x, y).backward()
    expected = {n: g[n] - lr * (p.grad - grad_k[n]) for n, p in model.named_parameters()}

    set_state(model, algo.client_start(1, g))
    algo.local_train(1, model, 1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)


def test_feddyn_gradient_state_update_is_minus_alpha_times_the_drift():
    alpha = 0.2
    engine = make_engine(small_config(algo="feddyn", rounds=3, join_ratio=0.5), alpha=alpha)
    algo = engine.algo
    seen = spy(algo, lambda cid: clone(algo.gradient_state(cid)))
    after = []
    original = algo.upload

    def upload(cid, trained):
        out = original(cid, trained)
        after.append(clone(algo.grad_state[cid]))
        return out

    algo.upload = upload
    engine.run()
    assert len(seen) == 9 and len({cid for cid, *_ in seen}) < 9  # some clients train twice
    for (cid, x, g_old, theta), g_new in zip(seen, after):
        for n in g_old:
            torch.testing.assert_close(g_new[n], g_old[n] - alpha * (theta[n] - x[n]), rtol=1e-6, atol=1e-9)
    assert any(float(g.abs().max()) > 0 for state in algo.grad_state.values() for g in state.values())


def test_feddyn_server_step_on_a_hand_example():
    engine = make_engine(small_config(algo="feddyn", clients=6), alpha=0.5)
    algo = engine.algo
    x = constant_state(engine.global_state, 1.0)
    expected = {0: 10, 1: 30}
    for round_, (h, theta) in enumerate([(-0.5, 5.0), (-1.0, 6.0)], start=1):
        acc = algo.begin_aggregation(x, expected)
        algo.accumulate(acc, Upload(0, 10, constant_state(x, 3.0)))
        algo.accumulate(acc, Upload(1, 30, constant_state(x, 5.0)))
        out = algo.finish_aggregation(acc, x)
        # h = h_prev - 0.5 * (1/6) * ((3 - 1) + (5 - 1)); theta = mean(3, 5) - h / 0.5
        assert all(torch.allclose(v, torch.full_like(v, h)) for v in algo.h.values()), round_
        assert all(torch.allclose(v, torch.full_like(v, theta)) for v in out.values()), round_

    weighted = make_engine(small_config(algo="feddyn", clients=6), alpha=0.5, weighting="samples").algo
    acc = weighted.begin_aggregation(x, expected)
    weighted.accumulate(acc, Upload(0, 10, constant_state(x, 3.0)))
    weighted.accumulate(acc, Upload(1, 30, constant_state(x, 5.0)))
    out = weighted.finish_aggregation(acc, x)
    # (10 * 3 + 30 * 5) / 40 = 4.5, h as above (the drift sum is not weighted): 4.5 + 1
    assert all(torch.allclose(v, torch.full_like(v, 5.5)) for v in out.values())


def test_feddyn_h_is_the_mean_of_all_client_gradient_states_after_every_round():
    engine = make_engine(small_config(algo="feddyn", rounds=3, join_ratio=0.5, clients=6), alpha=0.1)
    algo, checked = engine.algo, []

    def check(round_, figures):
        n = len(engine.clients)
        for k, h in algo.h.items():
            mean = sum(algo.gradient_state(cid)[k] for cid in range(n)) / n
            torch.testing.assert_close(h, mean, rtol=1e-5, atol=1e-7)
        checked.append(round_)

    engine.run(progress=check)
    assert checked == [1, 2, 3]
    assert any(float(v.abs().max()) > 0 for v in algo.h.values())


def test_feddyn_step_clips_cross_entropy_and_linear_part_then_adds_alpha_theta():
    from algorithms.feddyn import DynamicSGD

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    p.grad, q.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0])
    linear = [torch.tensor([0.0, 4.0]), torch.tensor([0.0])]  # gradient + linear = (3, 4, 0): norm 5
    opt = DynamicSGD([p, q], linear, alpha=0.1, max_norm=1.0, lr=1.0, momentum=0.0, weight_decay=0.0)
    opt.step()
    # clipped to (0.6, 0.8, 0), then + 0.1 * theta
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - (0.6 + 0.1), -2.0 - (0.8 - 0.2)]))
    torch.testing.assert_close(q.detach(), torch.tensor([0.5 - 0.05]))


def test_feddyn_sends_the_model_both_ways_as_fedavg():
    engine = make_engine(small_config(algo="feddyn", rounds=2, join_ratio=0.5))
    result = engine.run()
    full = model_bytes(engine)
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)


def test_feddyn_is_deterministic():
    config = small_config(algo="feddyn", rounds=2, join_ratio=0.5)
    assert metrics(make_engine(config).run()) == metrics(make_engine(config).run())


@pytest.mark.parametrize("hp, message", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"alpha": math.nan}, "alpha"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"weighting": "median"}, "weighting"),
])
def test_feddyn_rejects_bad_hyperparameters(hp, message):
    with pytest.raises(UserError, match=message):
        make_engine(small_config(algo="feddyn"), **hp)


# == both ==========================================================================================

@pytest.mark.parametrize("algo", ["scaffold", "feddyn"])
def test_runs_on_the_conv_models_and_evaluates_the_global_model(algo):
    data16 = digits16()
    for model in ("fedavgcnn", "lenet5"):
        config = small_config(algo=algo, rounds=1, join_ratio=0.5, model=model)
        engine = make_engine(config, data=data16)
        result = engine.run()
        assert math.isfinite(result.summary["acc"])
        g = engine.global_state
        assert all(states_equal(engine.algo.eval_state(cid, g), g) for cid in range(config.clients))
        assert engine.algo.eval_adaptation() == "none"

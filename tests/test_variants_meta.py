"""Variants of FedSelect (growth window), Per-FedAvg (test-time adaptation) and pFedMe (inner
weight decay, outer step): each variant's defining property, exactly.

Hand-written steps use torch's fused `add(x, y, alpha=-lr)` (x - lr * y in one rounding), the
form the algorithms and torch's optimizers use, so that equalities can be exact."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_engine, metrics, small_config, states_equal
from pflbench.core.registry import get_algorithm, load_algorithms
from pflbench.core.state import get_state, set_state


def algorithm_class(name):
    load_algorithms()
    return get_algorithm(name)


# -- FedSelect: growth every N participations --------------------------------------------------------

def top_k_in_element_order(delta: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest deltas among the candidates, ties to the lower index."""
    idx = np.flatnonzero(candidates)
    order = np.lexsort((idx, -delta[idx]))  # primary: delta descending; then element order
    return idx[order[:k]]


def spy_fedselect(algo):
    """Per client, one record per participation: the global state the server sent, the mask the
    client trained with, the payload it sent, the trained state and the mask afterwards."""
    records = {}
    start, upload = algo.client_start, algo.upload
    sent = {}

    def client_start(cid, g):
        sent[cid] = {k: v.clone() for k, v in g.items()}
        return start(cid, g)

    def spy_upload(cid, trained):
        before = {k: m.clone() for k, m in algo.mask_of(cid).items()}
        payload = upload(cid, trained)
        records.setdefault(cid, []).append({
            "global": sent[cid], "before": before, "payload": {k: v.clone() for k, v in payload.items()},
            "trained": {k: v.clone() for k, v in trained.items()},
            "after": {k: m.clone() for k, m in algo.mask_of(cid).items()},
            "kept": {k: v.clone() for k, v in algo.kept.get(cid, {}).items()}})
        return payload

    algo.client_start, algo.upload = client_start, spy_upload
    return records


def test_fedselect_grows_only_every_n_participations_by_the_top_k_change_over_the_window():
    n_every, p, cap = 2, 0.3, 0.6
    engine = make_engine(small_config(algo="fedselect", rounds=8, join_ratio=0.5), p=p, max_personal=cap,
                         grow_every=n_every)
    algo = engine.algo
    records = spy_fedselect(algo)
    engine.run()
    numel = {k: engine.global_state[k].numel() for k in algo.eligible}
    growths = window_differs_from_last_round = unchanged_nonempty = 0
    for cid, parts in records.items():
        for j, rec in enumerate(parts, start=1):
            before, after, trained = rec["before"], rec["after"], rec["trained"]
            if j % n_every:
                assert before.keys() == after.keys()
                assert all(torch.equal(before[k], after[k]) for k in before)  # no growth
                unchanged_nonempty += bool(after)
                continue
            growths += 1
            window = parts[j - n_every]  # the window's first participation
            assert set(after) == set(algo.eligible)
            for key in algo.eligible:
                n = numel[key]
                prev = before.get(key, torch.zeros_like(trained[key], dtype=torch.bool))
                # the mask was fixed during the window, so every candidate was shared throughout
                assert torch.equal(window["before"].get(key, torch.zeros_like(prev)), prev)
                shared = (~prev).flatten().numpy()
                # what the server holds: the uploaded shared values and the global values it sent
                values = rec["payload"][key].flatten() if not prev.any() else \
                    torch.zeros(n).masked_scatter(~prev.flatten(), rec["payload"][key])
                delta = (values - window["global"][key].flatten()).abs().numpy()
                s = int(prev.sum())
                k = max(0, min(int(np.floor(cap * n)) - s, int(round(p * (n - s)))))
                expected = prev.flatten().clone()
                expected[torch.as_tensor(top_k_in_element_order(delta, shared, k), dtype=torch.long)] = True
                assert torch.equal(after[key].flatten(), expected), (cid, j, key)
                assert int(after[key].sum()) == s + k
                # with N > 1 the window's ranking is not the last round's
                last = (trained[key] - rec["global"][key]).abs().flatten().numpy()
                window_differs_from_last_round += n_every > 1 and not np.array_equal(
                    np.sort(top_k_in_element_order(last, shared, k)),
                    np.sort(top_k_in_element_order(delta, shared, k)))
    assert growths >= 4
    assert unchanged_nonempty > 0  # participations after a growth that kept a non-empty mask
    assert window_differs_from_last_round > 0  # the window's change is not the last round's


def test_fedselect_personal_values_follow_training_between_growths():
    engine = make_engine(small_config(algo="fedselect", rounds=4), p=0.3, grow_every=2)
    algo = engine.algo
    records = spy_fedselect(algo)
    engine.run()
    for cid, parts in records.items():  # everyone joins every round: growth after rounds 2 and 4
        assert [bool(r["after"]) for r in parts] == [False, True, True, True]
        grown = [int(sum(m.sum() for m in r["after"].values())) for r in parts]
        assert grown[1] == grown[2] < grown[3]
        for rec in parts[1:]:  # growth or not, the personal values are the ones just trained
            assert rec["kept"].keys() == rec["after"].keys()
            for key, m in rec["after"].items():
                assert torch.equal(rec["kept"][key], rec["trained"][key][m])
    assert not algo.window_start  # every window closed after 4 participations


@pytest.mark.parametrize("grow_every", [1, 2])
def test_fedselect_without_growth_is_fedavg_for_any_window(grow_every):
    config = small_config(join_ratio=0.5, rounds=3)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    fedselect = make_engine(config.replace(algo="fedselect"), p=0.0, grow_every=grow_every)
    assert metrics(fedselect.run()) == metrics(fedavg)
    assert not fedselect.algo.window_start  # nothing can grow, so no start values are held


def test_fedselect_grow_every_is_validated():
    hp = algorithm_class("fedselect").Hyperparams
    assert hp().grow_every == 3
    with pytest.raises(ValueError, match="grow_every"):
        hp(grow_every=0)


# -- Per-FedAvg: test-time adaptation ----------------------------------------------------------------

def alpha_steps(model, state, batches, alpha):
    set_state(model, state)
    params = list(model.parameters())
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-alpha)
    return get_state(model)


def eval_batches(engine, cid, count, epochs=3):
    stream = engine.trainer.batches(cid, epochs, 0, purpose="perfedavg-eval")
    return [b for _, b in zip(range(count), stream)]


def test_perfedavg_one_eval_step_is_the_single_step_on_the_fixed_batch():
    engine = make_engine(small_config(algo="perfedavg", rounds=1), alpha=0.05, eval_steps=1)
    engine.run()
    algo, g = engine.algo, engine.global_state
    model = copy.deepcopy(engine.model)
    for cid in (0, 3):
        state = algo.eval_state(cid, g)
        batch = next(iter(engine.trainer.batches(cid, 1, 0, purpose="perfedavg-eval")))
        assert torch.equal(algo.adaptation_batch(cid)[0], batch[0])
        assert states_equal(state, alpha_steps(model, g, [batch], 0.05))
        assert not states_equal(state, g)


@pytest.mark.parametrize("steps, batch_size", [(3, 16), (7, 64)])
def test_perfedavg_k_eval_steps_are_k_steps_on_k_fixed_batches(steps, batch_size):
    engine = make_engine(small_config(algo="perfedavg", rounds=1, batch_size=batch_size), alpha=0.05,
                         eval_steps=steps)
    engine.run()
    algo, g = engine.algo, engine.global_state
    cid = 1
    batches = eval_batches(engine, cid, steps)
    assert len(batches) == steps
    if batch_size == 64:  # more steps than one epoch has batches: the next pass continues
        assert len(engine.clients[cid].train) < steps * batch_size
    state = algo.eval_state(cid, g)
    assert states_equal(state, alpha_steps(copy.deepcopy(engine.model), g, batches, 0.05))
    assert states_equal(algo.eval_state(cid, g), state)  # deterministic and read-only
    assert states_equal(engine.global_state, g)
    one = alpha_steps(copy.deepcopy(engine.model), g, batches[:1], 0.05)
    assert not states_equal(state, one)


def test_perfedavg_epoch_adaptation_is_one_epoch_of_the_runs_sgd():
    config = small_config(algo="perfedavg", rounds=1, lr=0.03, momentum=0.7, weight_decay=0.01)
    engine = make_engine(config, alpha=0.05, eval_adapt_mode="epoch", eval_steps=4)
    engine.run()
    algo, g = engine.algo, engine.global_state
    cid = 2
    state = algo.eval_state(cid, g)
    model = copy.deepcopy(engine.model)
    set_state(model, g)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.7, weight_decay=0.01)
    batches = list(engine.trainer.batches(cid, 1, 0, purpose="perfedavg-eval"))
    assert sum(len(y) for _, y in batches) == engine.clients[cid].n_train
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert states_equal(state, get_state(model))
    assert states_equal(algo.eval_state(cid, g), state)  # deterministic and read-only
    algo.hp.alpha = 0.5  # alpha is not the step size of this mode
    assert states_equal(algo.eval_state(cid, g), state)


def test_perfedavg_with_alpha_zero_and_several_eval_steps_is_exactly_fedavg():
    config = small_config(join_ratio=0.5, rounds=2)
    fedavg = make_engine(config.replace(algo="fedavg")).run()
    per = make_engine(config.replace(algo="perfedavg"), alpha=0.0, eval_steps=3, weighting="samples").run()
    assert metrics(per) == metrics(fedavg)


def batch_sizes(n, batch_size, count):
    """Sizes of the first `count` batches of passes over n samples."""
    epoch = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return (epoch * (count // len(epoch) + 1))[:count]


@pytest.mark.parametrize("mode, steps", [("steps", 1), ("steps", 5), ("epoch", 1)])
def test_perfedavg_counts_every_evaluation_gradient(mode, steps):
    config = small_config(algo="perfedavg", rounds=2, eval_every=1, join_ratio=0.5, batch_size=32)
    engine = make_engine(config, eval_steps=steps, eval_adapt_mode=mode)
    summary = engine.run().summary
    sizes = [c.n_train for c in engine.clients]
    per_eval = sum(sizes) if mode == "epoch" else sum(sum(batch_sizes(n, 32, steps)) for n in sizes)
    assert summary["eval_grad_evals"] == 2 * per_eval  # two evaluations, every client
    trained = sum(engine.clients[c].n_train for sampled in engine.schedule for c in sampled)
    assert summary["grad_evals"] == 2 * trained  # fo: inner and outer gradient per batch


def test_perfedavg_describes_each_adaptation_mode():
    cls = algorithm_class("perfedavg")
    steps = cls.describe_eval_adaptation(cls.Hyperparams(eval_steps=3, alpha=0.02))
    assert steps.startswith("3 gradient step(s) (alpha=0.02)")
    epoch = cls.describe_eval_adaptation(cls.Hyperparams(eval_adapt_mode="epoch"))
    assert epoch.startswith("one epoch of the run's SGD")
    assert "{" not in steps + epoch
    engine = make_engine(small_config(algo="perfedavg", rounds=1), eval_adapt_mode="epoch")
    assert engine.run().summary["eval_adapt"] == epoch
    with pytest.raises(ValueError, match="eval_steps"):
        cls.Hyperparams(eval_steps=0)


# -- pFedMe: inner weight decay and the outer step ------------------------------------------------------

def manual_pfedme(engine, cid, round_, *, lam, k, personal_lr, mu, lr):
    """The client update by hand: K inner steps per batch with weight decay mu, then the paper's
    plain outer step w <- w - lr * lam * (w - theta)."""
    model = copy.deepcopy(engine.model)
    start = get_state(engine.model)
    theta_model = copy.deepcopy(engine.model)
    theta = list(theta_model.parameters())
    w = [start[n].clone() for n, _ in model.named_parameters()]
    for x, y in engine.trainer.batches(cid, engine.config.local_epochs, round_, purpose="train"):
        for _ in range(k):
            grads = torch.autograd.grad(F.cross_entropy(theta_model(x), y), theta)
            with torch.no_grad():
                for t, g, wl in zip(theta, grads, w):
                    t.copy_(torch.add(t, g + lam * (t - wl) + mu * t, alpha=-personal_lr))
        with torch.no_grad():
            w = [torch.add(wl, lam * (wl - t), alpha=-lr) for wl, t in zip(w, theta)]
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, w)), get_state(theta_model)


def one_client_update(config, **hp):
    engine = make_engine(config, **hp)
    start = get_state(engine.model)
    engine.algo.local_train(0, engine.model, 1)
    trained = get_state(engine.model)
    set_state(engine.model, start)
    return engine, trained, engine.algo.personal_models[0]


def test_pfedme_mu_enters_the_inner_step_as_weight_decay_on_theta():
    # one batch (the whole client), two inner steps: the second has both the proximal and the mu term
    config = small_config(algo="pfedme", batch_size=10_000, lr=0.05)
    hp = dict(lam=3.0, k=2, personal_lr=0.03)
    engine, trained, theta = one_client_update(config, mu=0.1, **hp)
    w, expected_theta = manual_pfedme(engine, 0, 1, mu=0.1, lr=0.05, **hp)
    assert states_equal(theta, expected_theta)
    assert states_equal(trained, w)
    _, _, theta0 = one_client_update(config, mu=0.0, **hp)
    assert not states_equal(theta0, theta)


def test_pfedme_plain_outer_step_ignores_the_runs_momentum_and_weight_decay():
    config = small_config(algo="pfedme", lr=0.05, momentum=0.7, weight_decay=0.01, local_epochs=2)
    hp = dict(lam=3.0, k=2, personal_lr=0.03, mu=0.001)
    engine, trained, theta = one_client_update(config, outer="plain", **hp)
    w, expected_theta = manual_pfedme(engine, 0, 1, lr=0.05, **hp)
    assert states_equal(trained, w) and states_equal(theta, expected_theta)
    _, run_trained, _ = one_client_update(config, outer="run", **hp)
    assert not states_equal(run_trained, trained)  # momentum 0.7 and weight decay change `run`


def test_pfedme_outer_choices_agree_without_momentum_and_weight_decay():
    config = small_config(algo="pfedme", join_ratio=0.5, rounds=2)
    plain = make_engine(config, k=2, outer="plain").run()
    run = make_engine(config, k=2, outer="run").run()
    assert metrics(plain) == metrics(run)


def test_pfedme_counts_k_times_fedavgs_gradients_with_every_option():
    config = small_config(join_ratio=0.5, rounds=2, local_epochs=2, momentum=0.7)
    fedavg = make_engine(config.replace(algo="fedavg")).run().summary
    for outer in ("plain", "run"):
        pfedme = make_engine(config.replace(algo="pfedme"), k=3, mu=0.001, outer=outer).run().summary
        assert pfedme["grad_evals"] == 3 * fedavg["grad_evals"]
        assert pfedme["eval_grad_evals"] == 0


def test_pfedme_defaults_and_validation():
    hp = algorithm_class("pfedme").Hyperparams
    assert (hp().mu, hp().outer) == (0.0, "plain")
    with pytest.raises(ValueError, match="mu"):
        hp(mu=-0.1)
    with pytest.raises(ValueError, match="outer"):
        hp(outer="adam")

"""Head methods: FedRoD, pFedFDA and FLUTE, each checked on an exact property of its definition,
its exact communication bytes, and an end-to-end run."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import capture_uploads, comm_bytes, make_engine, small_config, states_equal, without_timing
from pflbench.core.state import get_state, nbytes, set_state, subset


def logits_on_test(engine, model, cid):
    model.eval()
    with torch.no_grad():
        return model(engine.trainer.data.x[engine.clients[cid].test])


def run_finite(engine):
    result = engine.run()
    assert all(math.isfinite(r["acc"]) and math.isfinite(r["loss"]) for r in result.rounds)
    assert 0.0 <= result.summary["acc"] <= 100.0
    return result


# -- FedRoD ---------------------------------------------------------------------------------------

def test_balanced_softmax_is_cross_entropy_under_uniform_labels_and_handles_absent_classes():
    from algorithms.fedrod import balanced_softmax_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    # (a) equal counts: the prior shift is exactly 0, so the loss is exactly plain CE
    assert torch.equal(balanced_softmax_loss(logits, y, torch.full((10,), 7)), F.cross_entropy(logits, y))
    # otherwise: CE of logits + log n_c (equal up to rounding: a per-row constant is dropped)
    counts = torch.arange(1, 11)
    expected = F.cross_entropy(logits + counts.float().log(), y)
    assert torch.allclose(balanced_softmax_loss(logits, y, counts), expected, atol=1e-6)
    # an absent class leaves the softmax: finite loss, finite gradients, none on that class
    y_local = torch.arange(32) % 5  # classes 5..9 absent
    leaf = logits.clone().requires_grad_(True)
    loss = balanced_softmax_loss(leaf, y_local, torch.bincount(y_local, minlength=10))
    loss.backward()
    absent = torch.arange(5, 10)
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[:, absent], torch.zeros_like(leaf.grad[:, absent]))


def test_fedrod_keeps_personal_heads_home_and_sends_exactly_the_whole_model():
    engine = make_engine(small_config(algo="fedrod", rounds=2, join_ratio=0.5))
    algo = engine.algo
    uploads = capture_uploads(algo)
    result = engine.run()
    assert len(uploads) == 2 and all(len(r) == 3 for r in uploads)
    assert all(set(u.payload) == set(algo.all_keys) for r in uploads for u in r)
    sampled = {u.cid for r in uploads for u in r}
    assert set(algo.personal_heads) == sampled
    assert all(set(algo.personal_heads[c]) == {"weight", "bias"} for c in sampled)
    full = nbytes(subset(engine.global_state, algo.all_keys))
    assert comm_bytes(result) == (2 * 3 * full, 2 * 3 * full)


def test_fedrod_with_zero_personal_head_predicts_exactly_as_the_global_model():
    engine = make_engine(small_config(algo="fedrod", rounds=2, join_ratio=0.5))
    engine.run()
    algo, g, trainer = engine.algo, engine.global_state, engine.trainer
    trained = dict(algo.personal_heads)
    for cid in range(6):  # (c) the generic + zero residual is the generic predictor, bit for bit
        algo.personal_heads[cid] = {k: torch.zeros_like(v) for k, v in algo.initial_phead.items()}
        personal = logits_on_test(engine, algo.eval_model(cid, g), cid)
        res_personal = trainer.evaluate(algo.eval_model(cid, g), cid)
        set_state(engine.model, g)
        assert torch.equal(personal, logits_on_test(engine, engine.model, cid))
        assert res_personal == trainer.evaluate(engine.model, cid)
    # a trained personal head does change the predictions, and evaluating does not change it
    cid = next(iter(trained))
    algo.personal_heads[cid] = trained[cid]
    before = {k: v.clone() for k, v in trained[cid].items()}
    personal = logits_on_test(engine, algo.eval_model(cid, g), cid)
    set_state(engine.model, g)
    assert not torch.equal(personal, logits_on_test(engine, engine.model, cid))
    assert states_equal(algo.personal_heads[cid], before)


def test_fedrod_generic_update_does_not_depend_on_the_personal_head():
    """The P-head sees detached features and detached generic logits, so body and G-head follow
    the balanced softmax alone: two different P-heads give bit-identical generic updates."""
    states = []
    for pinit in ("zero", "generic"):
        engine = make_engine(small_config(algo="fedrod", local_epochs=2), pinit=pinit)
        set_state(engine.model, engine.algo.client_start(0, engine.global_state))
        engine.algo.local_train(0, engine.model, round_=1)
        states.append((get_state(engine.model), engine.algo.personal_heads[0]))
    (generic_a, personal_a), (generic_b, personal_b) = states
    assert states_equal(generic_a, generic_b)
    assert not states_equal(personal_a, personal_b)


def test_fedrod_runs_end_to_end():
    run_finite(make_engine(small_config(algo="fedrod", rounds=2, join_ratio=0.5), pinit="generic"))


# -- pFedFDA --------------------------------------------------------------------------------------

def test_lda_classifier_matches_a_hand_computation():
    from algorithms.pfedfda import lda_classifier

    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cov = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # inverse: [[2, -1], [-1, 2]] / 3
    priors = torch.tensor([0.25, 0.75], dtype=torch.float64)
    weight, bias = lda_classifier(means, cov, priors, eps=0.0)
    # w_c = cov^-1 mu_c; b_c = -mu_c^T cov^-1 mu_c / 2 + log pi_c (Cholesky solve: equal to rounding)
    hand_w = torch.tensor([[2 / 3, -1 / 3], [-1 / 3, 2 / 3]], dtype=torch.float64)
    hand_b = torch.tensor([-1 / 3 + math.log(0.25), -1 / 3 + math.log(0.75)], dtype=torch.float64)
    assert torch.allclose(weight, hand_w, rtol=0, atol=1e-12)
    assert torch.allclose(bias, hand_b, rtol=0, atol=1e-12)
    # shrinkage eps: (1 - eps) cov + eps tr(cov)/D I = [[2, 0.5], [0.5, 2]] at eps = 0.5
    weight, _ = lda_classifier(means, cov, priors, eps=0.5)
    shrunk_inv = torch.tensor([[2.0, -0.5], [-0.5, 2.0]], dtype=torch.float64) / 3.75
    assert torch.allclose(weight, shrunk_inv @ means.t(), rtol=0, atol=1e-12)


def eval_heads(engine):
    algo, g = engine.algo, engine.global_state
    heads = []
    for cid in range(len(engine.clients)):
        model = algo.eval_model(cid, g)
        heads.append((model.head.weight.detach().clone(), model.head.bias.detach().clone()))
    return heads


def test_pfedfda_with_global_statistics_shares_one_classifier():
    from algorithms.pfedfda import COV, MEANS, lda_classifier

    engine = make_engine(small_config(algo="pfedfda", rounds=2), beta=0.0, priors="uniform")
    engine.run()
    g = engine.global_state
    heads = eval_heads(engine)
    weight, bias = lda_classifier(g[MEANS].double(), g[COV].double(),
                                  torch.full((10,), 0.1, dtype=torch.float64), 1e-4)
    for w, b in heads:  # beta = 0 selects the global statistics: every client, one classifier
        assert torch.equal(w, weight.float()) and torch.equal(b, bias.float())
    # with local priors the discriminant directions are still shared; only the biases differ
    engine = make_engine(small_config(algo="pfedfda", rounds=1), beta=0.0)
    engine.run()
    heads = eval_heads(engine)
    assert all(torch.equal(w, heads[0][0]) for w, _ in heads)
    assert not all(torch.equal(b, heads[0][1]) for _, b in heads)


def test_pfedfda_trains_the_body_under_the_frozen_global_lda_head():
    from algorithms.pfedfda import COV, MEANS, lda_classifier

    engine = make_engine(small_config(algo="pfedfda"), beta=0.5)
    algo, model, g = engine.algo, engine.model, engine.global_state
    set_state(model, algo.client_start(0, g))
    algo.local_train(0, model, round_=1)
    after = get_state(model)
    weight, bias = lda_classifier(g[MEANS].double(), g[COV].double(), algo.priors(0), 1e-4)
    assert torch.equal(after["head.weight"], weight.float()) and torch.equal(after["head.bias"], bias.float())
    assert not states_equal(subset(after, algo.body_keys), subset(g, algo.body_keys))
    assert not torch.equal(after[MEANS], g[MEANS]) and not torch.equal(after[COV], g[COV])


def test_pfedfda_sends_body_and_statistics_and_counts_them():
    from algorithms.pfedfda import COV, MEANS

    engine = make_engine(small_config(algo="pfedfda", rounds=2, join_ratio=0.5))
    algo = engine.algo
    uploads = capture_uploads(algo)
    result = engine.run()
    assert all(set(u.payload) == {*algo.body_keys, MEANS, COV} for r in uploads for u in r)
    body = nbytes(subset(engine.global_state, algo.body_keys))
    dim = engine.model.head.weight.shape[1]
    per_client = body + 4 * (10 * dim + dim * dim)
    assert comm_bytes(result) == (2 * 3 * per_client, 2 * 3 * per_client)


def test_pfedfda_runs_end_to_end_with_deterministic_read_only_evaluation():
    engine = make_engine(small_config(algo="pfedfda", rounds=2, join_ratio=0.5))
    run_finite(engine)
    g = {k: v.clone() for k, v in engine.global_state.items()}
    first, again = eval_heads(engine), eval_heads(engine)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert states_equal(engine.global_state, g)
    feats, labels = engine.algo.features(engine.model, 0)
    b_mu, b_cov = engine.algo.cross_validated_betas(0, feats, labels, *engine.algo.global_stats(engine.model))
    assert b_mu in [i / 10 for i in range(11)] and b_cov in [i / 10 for i in range(11)]


# -- FLUTE ----------------------------------------------------------------------------------------

def test_flute_without_regularizers_is_exactly_fedper():
    config = small_config(rounds=3, join_ratio=0.5, local_epochs=2)
    fedper = make_engine(config.replace(algo="fedper")).run()
    flute = make_engine(config.replace(algo="flute"), lam1=0.0, lam2=0.0, lam3=0.0,
                        server_lr=0.0, rep_epochs=2).run()
    assert without_timing(flute.rounds) == without_timing(fedper.rounds)
    assert flute.clients == fedper.clients


def test_nc2_term_vanishes_on_a_simplex_etf():
    from algorithms.flute import nc2_term

    c = 5
    etf = torch.eye(c, dtype=torch.float64) - 1.0 / c  # (I - 11^T/C) is idempotent: W W^T = W
    assert nc2_term(3.0 * etf, torch.ones(c, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-12)
    assert nc2_term(torch.eye(c, dtype=torch.float64), torch.ones(c, dtype=torch.bool)).item() > 0.1


def test_flute_head_epochs_leave_the_body_untouched_and_the_server_steps_the_heads():
    from algorithms.flute import LABELS, nc2_term

    engine = make_engine(small_config(algo="flute", local_epochs=2, rounds=1), rep_epochs=0)
    algo, model, g = engine.algo, engine.model, engine.global_state
    set_state(model, algo.client_start(0, g))
    algo.local_train(0, model, round_=1)
    after = get_state(model)
    assert states_equal(subset(after, algo.body_keys), subset(g, algo.body_keys))
    assert not states_equal(subset(after, algo.head_keys), subset(g, algo.head_keys))
    uploads = capture_uploads(algo)
    engine.train_round(1)
    (ups,) = uploads
    for u in ups:  # the server's NC2 step moved each uploaded head weight downhill, bias untouched
        sent, kept = u.payload["head.weight"], algo.kept[u.cid]["head.weight"]
        assert nc2_term(kept, u.payload[LABELS]) < nc2_term(sent, u.payload[LABELS])
        assert algo.kept[u.cid]["head.bias"].shape == (10,)
    assert algo.pending == {u.cid for u in ups}


def test_flute_sends_body_up_and_down_plus_heads_for_the_server_step():
    engine = make_engine(small_config(algo="flute", rounds=3))
    result = run_finite(engine)
    body = nbytes(subset(engine.global_state, engine.algo.body_keys))
    weight = nbytes({"w": engine.global_state["head.weight"]})
    up = 3 * 6 * (body + weight + 10)  # + u_i as 10 bytes
    down = 3 * 6 * body + 2 * 6 * weight  # a server-stepped head goes back at the next visit
    assert comm_bytes(result) == (up, down)
    plain = make_engine(small_config(algo="flute", rounds=2), server_lr=0.0)
    assert comm_bytes(plain.run()) == (2 * 6 * body, 2 * 6 * body)

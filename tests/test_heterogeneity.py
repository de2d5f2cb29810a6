"""Heterogeneity beyond label skew: quantity skew, extended Dirichlet, natural partitions, feature
skew, the measured skew of a partition, and clients that never train (holdout newcomers)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_engine, small_config
from pflbench.core.natural import NaturalClients
from pflbench.core.partition import PartitionSpec, cached_partition, holdout_clients, label_counts, partition
from pflbench.core.schemes import quantity_sizes
from pflbench.core.skew import skew_measures
from pflbench.core.state import set_state
from pflbench.errors import UserError
from pflbench.experiments.runner import compute_run, execute

LABELS = np.repeat(np.arange(10), 200)  # 2,000 samples, 10 balanced classes


def pool_indices(splits):
    return np.concatenate([np.concatenate([s.train, s.test, s.val]) for s in splits])


def same_splits(a, b):
    return all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))


@pytest.mark.parametrize("spec", [
    PartitionSpec(scheme="quantity", num_clients=20, seed=1, sigma=1.5),
    PartitionSpec(scheme="quantity", num_clients=20, seed=1, sigma=0.5, size_dist="powerlaw"),
    PartitionSpec(scheme="exdir", num_clients=20, seed=1, alpha=0.3, classes_per_client=3),
])
def test_new_schemes_are_disjoint_complete_and_a_function_of_their_key(spec):
    splits = partition(LABELS, spec)
    idx = pool_indices(splits)
    assert np.array_equal(np.sort(idx), np.arange(len(LABELS)))  # every sample once
    assert min(len(s.train) + len(s.test) for s in splits) >= spec.min_samples
    assert same_splits(splits, partition(LABELS, spec))
    other = PartitionSpec(**{**spec.__dict__, "seed": spec.seed + 1})
    assert not same_splits(splits, partition(LABELS, other))


def test_quantity_sizes_are_as_drawn_and_labels_stay_iid():
    spec = PartitionSpec(scheme="quantity", num_clients=10, seed=4, sigma=1.0)
    splits = partition(LABELS, spec)
    drawn = quantity_sizes(len(LABELS), spec, np.random.default_rng(spec.seed))  # the scheme's first draws
    assert [len(s.train) + len(s.test) for s in splits] == drawn.tolist()
    assert drawn.sum() == len(LABELS) and drawn.min() >= spec.min_samples
    counts = label_counts(LABELS, splits, 10).sum(axis=1)
    big = counts[np.argmax(drawn)]  # the largest client holds every class in near-equal shares
    assert big.min() > 0 and big.max() / big.sum() < 0.2


def test_exdir_gives_each_client_at_most_its_classes():
    spec = PartitionSpec(scheme="exdir", num_clients=20, seed=2, alpha=1.0, classes_per_client=2)
    counts = label_counts(LABELS, partition(LABELS, spec), 10).sum(axis=1)
    assert ((counts > 0).sum(axis=1) <= 2).all()


def mean_over_seeds(spec_fn, measure, seeds=3):
    values = []
    for seed in range(seeds):
        spec = spec_fn(seed)
        values.append(skew_measures(label_counts(LABELS, partition(LABELS, spec), 10))[measure])
    return float(np.mean(values))


def test_larger_sigma_gives_larger_measured_size_skew():
    cv = [mean_over_seeds(lambda s, g=g: PartitionSpec(scheme="quantity", num_clients=20, seed=s, sigma=g),
                          "size_cv") for g in (0.25, 1.0, 2.0)]
    assert cv[0] < cv[1] < cv[2]
    pl = [mean_over_seeds(lambda s, g=g: PartitionSpec(scheme="quantity", num_clients=20, seed=s, sigma=g,
                                                       size_dist="powerlaw"), "size_cv") for g in (0.2, 0.8)]
    assert pl[0] < pl[1]


@pytest.mark.parametrize("scheme", ["dirichlet", "exdir"])
@pytest.mark.parametrize("measure", ["skew_hellinger", "skew_js"])
def test_lower_alpha_gives_larger_measured_label_skew(scheme, measure):
    values = [mean_over_seeds(lambda s, a=a: PartitionSpec(scheme=scheme, num_clients=10, seed=s, alpha=a,
                                                           classes_per_client=5), measure) for a in (0.1, 1.0, 100.0)]
    assert values[0] > values[1] > values[2]


def test_skew_measures_exact_at_their_bounds():
    same = np.array([[5, 5], [10, 10]])  # every client like the pool; sizes 10 and 20
    assert skew_measures(same) == pytest.approx({"skew_hellinger": 0.0, "skew_js": 0.0, "size_cv": 1 / 3})
    disjoint = np.array([[7, 0], [0, 7]])  # each client one class; pool 50/50
    m = skew_measures(disjoint)
    assert m["size_cv"] == 0.0
    assert m["skew_hellinger"] == pytest.approx(np.sqrt(1 - np.sqrt(0.5)))
    # JS divergence of (1, 0) and (1/2, 1/2), in bits, via their mixture (3/4, 1/4)
    kl_p = np.log2(1 / 0.75)
    kl_q = 0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)
    assert m["skew_js"] == pytest.approx(np.sqrt(0.5 * (kl_p + kl_q)))


# -- natural partitions ---------------------------------------------------------------------------

def natural_ids(sizes_train, sizes_test):
    ids = np.concatenate([np.repeat(np.arange(len(sizes_train)), sizes_train),
                          np.repeat(np.arange(len(sizes_test)), sizes_test)])
    return NaturalClients(ids=ids, is_test=np.arange(len(ids)) >= sum(sizes_train))


def test_natural_partition_keeps_each_clients_own_samples_and_picks_the_largest():
    nat = natural_ids([5, 30, 12, 8], [2, 6, 0, 4])  # client 2 has no test sample: not eligible
    labels = np.zeros(len(nat.ids), dtype=np.int64)
    splits = partition(labels, PartitionSpec(scheme="natural", num_clients=2, seed=0), nat)
    # the two largest eligible clients are 1 (36 samples) and 3 (12), in id order
    assert [len(s.train) for s in splits] == [30, 8] and [len(s.test) for s in splits] == [6, 4]
    for s, cid in zip(splits, (1, 3)):
        assert (nat.ids[s.train] == cid).all() and not nat.is_test[s.train].any()
        assert (nat.ids[s.test] == cid).all() and nat.is_test[s.test].all()
    sampled = partition(labels, PartitionSpec(scheme="natural", num_clients=2, seed=0, natural_pick="sample"), nat)
    again = partition(labels, PartitionSpec(scheme="natural", num_clients=2, seed=0, natural_pick="sample"), nat)
    assert same_splits(sampled, again)
    with pytest.raises(UserError, match="only 3 clients"):
        partition(labels, PartitionSpec(scheme="natural", num_clients=4, seed=0), nat)
    with pytest.raises(UserError, match="client_train and client_test"):
        partition(labels, PartitionSpec(scheme="natural", num_clients=2, seed=0))


def write_natural_npz(path, writers=6, per_writer=(40, 10)):
    """A FEMNIST-like file: 8x8 images, 10 classes, a writer id per sample of each split."""
    rng = np.random.default_rng(0)
    n_tr, n_te = writers * per_writer[0], writers * per_writer[1]
    np.savez(path, x_train=rng.integers(0, 255, (n_tr, 8, 8, 1), dtype=np.uint8),
             y_train=rng.integers(0, 10, n_tr), x_test=rng.integers(0, 255, (n_te, 8, 8, 1), dtype=np.uint8),
             y_test=rng.integers(0, 10, n_te), client_train=np.repeat(np.arange(writers), per_writer[0]),
             client_test=np.repeat(np.arange(writers), per_writer[1]))


def test_natural_run_end_to_end_from_a_generated_file(tmp_path):
    write_natural_npz(tmp_path / "writers.npz")
    config = small_config(dataset="writers", partition="natural", clients=4, rounds=1)
    record = compute_run(config, tmp_path, device="cpu")
    n = [r["n_test"] for r in record.clients]
    assert n == [10, 10, 10, 10]
    assert record.label_counts[:, 0].sum() == 4 * 40  # each client trains on its 40 own samples
    assert set(record.summary) >= {"skew_hellinger", "skew_js", "size_cv"}


def test_one_sided_client_ids_are_a_user_error(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "half.npz", x_train=rng.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=rng.integers(0, 255, (10, 8, 8, 1), dtype=np.uint8),
             y_test=np.arange(10) % 10, client_train=np.zeros(20, dtype=np.int64))
    with pytest.raises(UserError, match="client_train but not client_test"):
        compute_run(small_config(dataset="half", partition="natural", clients=1), tmp_path, device="cpu")


# -- feature skew ---------------------------------------------------------------------------------

def test_feature_skew_transforms_each_client_once_at_load(tmp_path):
    """The run trains on the transformed pool: the same run with noise differs, and a run is
    deterministic; the untransformed dataset object is left alone."""
    plain = compute_run(small_config(rounds=1), tmp_path, device="cpu")
    noisy = compute_run(small_config(rounds=1, feature_skew="noise", skew_strength=1.0), tmp_path, device="cpu")
    again = compute_run(small_config(rounds=1, feature_skew="noise", skew_strength=1.0), tmp_path, device="cpu")
    assert noisy.clients == again.clients
    assert noisy.clients != plain.clients
    assert np.array_equal(noisy.label_counts, plain.label_counts)  # the partition is the same
    rotated = small_config(feature_skew="rotate", skew_strength=30.0)
    assert rotated.run_id() != small_config().run_id()


# -- holdout clients ------------------------------------------------------------------------------

def test_holdout_clients_are_seeded_and_never_sampled():
    held = holdout_clients(0.25, 20, seed=3)
    assert len(held) == 5 and held == holdout_clients(0.25, 20, seed=3)
    assert held != holdout_clients(0.25, 20, seed=4)
    engine = make_engine(small_config(clients=8, holdout_clients=0.25, join_ratio=0.5, rounds=6))
    assert len(engine.holdout) == 2
    sampled = {c for r in engine.schedule for c in r}
    assert not sampled & set(engine.holdout) and len(engine.schedule[0]) == 3  # half of the 6 that train


def test_holdout_changes_the_partition_key_but_not_the_splits(tmp_path):
    spec = PartitionSpec(scheme="dirichlet", num_clients=10, seed=0)
    held = PartitionSpec(scheme="dirichlet", num_clients=10, seed=0, holdout=0.2)
    assert same_splits(partition(LABELS, spec), partition(LABELS, held))
    cached_partition(LABELS, spec, tmp_path)
    cached_partition(LABELS, held, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def registered_algorithms():
    from pflbench.core.registry import ALGORITHMS, load_algorithms

    load_algorithms()
    return sorted(ALGORITHMS)


@pytest.mark.parametrize("algo", registered_algorithms())
def test_a_holdout_clients_samples_never_get_a_gradient_in_training(algo):
    """Two witnesses over the training rounds. The pool tensor itself requires a gradient, so a
    backward pass through a sample leaves a non-zero gradient on its row; and the trainer records
    every mini-batch it deals (algorithms that take gradients with torch.func, which leave the
    pool's gradient alone, draw their batches there). The holdout clients' rows appear in neither,
    while most training rows appear in one."""
    hp = {"tau": 1, "endpoints": 3} if algo == "floco" else {}
    engine = make_engine(small_config(algo=algo, clients=6, holdout_clients=0.34, rounds=2, join_ratio=1.0), **hp)
    dealt = []
    original = engine.trainer.batch_indices

    def recording(cid, epochs, round_, purpose="train"):
        for take in original(cid, epochs, round_, purpose):
            dealt.append(take)
            yield take

    engine.trainer.batch_indices = recording
    x = engine.trainer.data.x
    # APFL backpropagates twice through one batch, which a pool that requires a gradient turns
    # into a second pass through the shared indexing op: its witness is the dealt batches alone
    x.requires_grad_(algo != "apfl")
    try:
        for round_ in (1, 2):
            engine.train_round(round_)
        grad = x.grad.abs().flatten(1).sum(1) if x.grad is not None else torch.zeros(len(x))
    finally:
        x.requires_grad_(False)
        x.grad = None
    seen = torch.zeros(len(x), dtype=torch.bool)
    if dealt:
        seen[torch.cat(dealt)] = True
    held_rows = torch.cat([torch.cat([engine.clients[c].train, engine.clients[c].test]) for c in engine.holdout])
    trained_rows = torch.cat([engine.clients[c].train for c in range(6) if c not in engine.holdout])
    assert len(engine.holdout) == 2
    assert grad[held_rows].sum() == 0 and not seen[held_rows].any()
    reached = (grad[trained_rows] > 0) | seen[trained_rows]
    assert reached.float().mean() > 0.7  # (FedFomo keeps a fifth for its own validation)


def test_fedavg_newcomers_are_scored_with_the_global_model(tmp_path):
    config = small_config(clients=8, holdout_clients=0.25, rounds=2, finetune_epochs=1)
    engine = make_engine(config)
    result = engine.run()
    rows = [r for r in result.clients if r["round"] == 2]
    for cid in engine.holdout:  # recompute each newcomer's accuracy with the final global model
        set_state(engine.model, engine.global_state)
        res = engine.trainer.evaluate(engine.model, cid)
        assert rows[cid]["holdout"] and rows[cid]["correct"] == res.correct
    s = result.summary
    held = [rows[c] for c in engine.holdout]
    assert s["acc_new"] == pytest.approx(100 * sum(r["correct"] for r in held) / sum(r["n_test"] for r in held))
    trained = [r for r in rows if not r["holdout"]]
    assert s["acc"] == pytest.approx(100 * sum(r["correct"] for r in trained) / sum(r["n_test"] for r in trained))
    assert s["participation_gap"] == pytest.approx(s["acc"] - s["acc_new"])
    assert "acc_new_ft" in s


def test_holdout_run_records_newcomer_figures_and_skew(tmp_path):
    path = execute(small_config(clients=8, holdout_clients=0.25, rounds=1, partition="quantity", sigma=1.0),
                   tmp_path, tmp_path / "data", device="cpu")
    summary = json.loads((path / "summary.json").read_text())
    assert {"acc_new", "participation_gap", "skew_hellinger", "skew_js", "size_cv"} <= set(summary)
    clients = pd.read_csv(path / "clients.csv")
    assert clients["holdout"].sum() == 2
    assert "-quantity1-" in path.name


def test_plain_runs_keep_their_ids_and_columns():
    """Settings added here stay out of a run's identity at their defaults, so committed records
    keep their ids; and a run without holdout clients has no holdout column."""
    assert small_config().canonical_json() == small_config(sigma=1.0, feature_skew="none").canonical_json()
    assert "holdout" not in small_config().canonical_json()
    result = make_engine(small_config(rounds=1)).run()
    assert "holdout" not in result.clients[0] and "acc_new" not in result.summary


@pytest.mark.parametrize("flags, message", [
    (["--partition", "quantity", "--sigma", "0"], "--sigma must be > 0"),
    (["--holdout-clients", "1.0"], "--holdout-clients must be in"),
    (["--feature-skew", "blur"], "unknown --feature-skew"),
    (["--partition", "natural"], "client_train and client_test"),
])
def test_bad_heterogeneity_flags_are_one_line_errors(tmp_path, flags, message):
    from typer.testing import CliRunner

    from pflbench.cli import app

    out = CliRunner().invoke(app, ["run", "--algo", "fedavg", "--dataset", "digits", "--rounds", "1",
                                   "--results", str(tmp_path), *flags])
    assert out.exit_code != 0
    assert message in out.output and "Traceback" not in out.output


def test_report_shows_newcomer_figures_and_the_measured_skew_beside_the_cell(tmp_path):
    from pflbench.analysis.report import build_report

    results = tmp_path / "results"
    for algo in ("fedavg", "local"):
        execute(small_config(algo=algo, clients=8, holdout_clients=0.25, rounds=1, partition="quantity"),
                results, tmp_path / "data", device="cpu")
    page = build_report(results, tmp_path / "reports").read_text()
    assert "### quantity (measured skew: Hellinger" in page and "size CV" in page
    assert "-sigma1-holdout0.25)" in page  # the protocol's name carries the heterogeneity settings
    # alpha is not a parameter of quantity skew: figures are named and titled by the partition alone
    figures = sorted(p.name for p in (tmp_path / "reports").glob("intervals_*.png"))
    assert figures and all(name.endswith("_quantity.png") for name in figures), figures
    assert "_a0.1" not in page
    assert "![newcomers_" in page and len(list((tmp_path / "reports").glob("newcomers_*_quantity.png"))) == 1
    board = pd.read_csv(results / "leaderboard.csv")
    assert {"acc_new", "participation_gap", "skew_js", "size_cv"} <= set(board.columns)
    assert np.allclose(board["participation_gap"], board["acc"] - board["acc_new"])
    # the intervals are over the clients that trained, as `acc` is: newcomers are not in them
    from pflbench.analysis.leaderboard import load_runs
    from pflbench.analysis.statistics import final_clients

    rows = final_clients(load_runs(results))
    assert (board["acc_new_ci_low"] <= board["acc_new"]).all() and (board["acc_new"] <= board["acc_new_ci_high"]).all()
    newcomers = final_clients(load_runs(results), newcomers=True)
    assert len(newcomers) == 2 * 2
    assert (newcomers.groupby("algo")["correct"].sum() * 100 / newcomers.groupby("algo")["n"].sum()).to_dict() == \
        pytest.approx(board.set_index("algo")["acc_new"].to_dict(), abs=1e-3)
    pooled = rows.groupby("algo")["correct"].sum() * 100 / rows.groupby("algo")["n"].sum()
    assert len(rows) == 2 * 6
    assert pooled.to_dict() == pytest.approx(board.set_index("algo")["acc"].to_dict(), abs=1e-3)


def test_run_prints_how_newcomers_fare(tmp_path):
    from typer.testing import CliRunner

    from pflbench.cli import app

    out = CliRunner().invoke(app, ["run", "--algo", "fedavg", "--dataset", "digits", "--rounds", "1", "--clients", "8",
                                   "--local-epochs", "1", "--holdout-clients", "0.25", "--finetune-epochs", "1",
                                   "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert f"newcomers {summary['acc_new']:.2f}%, after fine-tuning {summary['acc_new_ft']:.2f}%" in out.output


def test_an_algorithm_says_what_a_newcomer_gets_exactly_when_it_overrides_the_rule():
    """`pflbench list` shows `newcomer`: an algorithm with its own `newcomer_model` must describe
    it, and one without it must not claim a rule of its own."""
    from pflbench.core.algorithm import Algorithm
    from pflbench.core.registry import ALGORITHMS

    for name in registered_algorithms():
        cls = ALGORITHMS[name]
        overrides = cls.newcomer_model is not Algorithm.newcomer_model
        assert overrides == (cls.newcomer != Algorithm.newcomer), name

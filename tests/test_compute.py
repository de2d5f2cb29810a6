"""Local compute counted exactly in sample-gradients (one per sample per forward+backward pass),
training apart from test-time adaptation, and each algorithm's declared test-time adaptation."""

import pytest

from helpers import make_engine, small_config
from pflbench.core.registry import ALGORITHMS, load_algorithms


def samples_trained(engine) -> int:
    """Training samples of every sampled client over all rounds: FedAvg's per-epoch count."""
    return sum(engine.clients[cid].n_train for sampled in engine.schedule for cid in sampled)


def run(algo, **hp):
    engine = make_engine(small_config(algo=algo, rounds=2, join_ratio=0.5, local_epochs=2), **hp)
    return engine, engine.run().summary


def test_fedavg_counts_local_epochs_times_the_samples_of_every_sampled_client():
    engine, summary = run("fedavg")
    assert summary["grad_evals"] == 2 * samples_trained(engine)
    assert summary["eval_grad_evals"] == 0


def test_ditto_counts_its_personal_and_global_phases():
    engine, summary = run("ditto")
    assert summary["grad_evals"] == (2 + 2) * samples_trained(engine)
    engine, summary = run("ditto", personal_epochs=1)
    assert summary["grad_evals"] == (1 + 2) * samples_trained(engine)


def test_pfedme_counts_k_inner_steps_per_batch():
    engine, summary = run("pfedme", k=3)
    assert summary["grad_evals"] == 3 * 2 * samples_trained(engine)


def test_feddpa_counts_its_fisher_and_both_phases_and_its_evaluation_fisher():
    engine = make_engine(small_config(algo="feddpa", rounds=2, join_ratio=1.0, local_epochs=1, eval_every=1))
    summary = engine.run().summary
    n_all = sum(c.n_train for c in engine.clients)
    # round 1: no local model yet, so no Fisher and nothing personal: the shared phase alone;
    # round 2: the Fisher of the kept model, then the personal and the shared phase
    assert engine.algo.personal_sum > 0
    assert summary["grad_evals"] == n_all + (n_all + n_all + n_all)
    # each evaluation merges by the Fisher of every client's kept model
    assert summary["eval_grad_evals"] == 2 * n_all


def test_fedbabu_fine_tuning_counts_as_evaluation_compute():
    engine = make_engine(small_config(algo="fedbabu", rounds=2, eval_every=1), finetune_epochs=3)
    summary = engine.run().summary
    n_all = sum(c.n_train for c in engine.clients)
    assert summary["grad_evals"] == samples_trained(engine)  # local_epochs = 1
    assert summary["eval_grad_evals"] == 2 * 3 * n_all


def test_rounds_csv_carries_the_cumulative_count():
    engine = make_engine(small_config(algo="fedavg", rounds=3, eval_every=1))
    result = engine.run()
    per_round = [sum(engine.clients[c].n_train for c in sampled) for sampled in engine.schedule]
    assert [r["grad_evals"] for r in result.rounds] == [sum(per_round[:i + 1]) for i in range(3)]


def test_every_algorithm_declares_its_test_time_adaptation():
    load_algorithms()
    for name, cls in ALGORITHMS.items():
        text = cls.describe_eval_adaptation(cls.Hyperparams())
        assert text and "{" not in text, name


def test_every_algorithm_declares_what_it_keeps_per_client():
    load_algorithms()
    for name, cls in ALGORITHMS.items():
        text = cls.describe_client_state(cls.Hyperparams())
        assert text and "{" not in text, name
    assert ALGORITHMS["fedavg"].describe_client_state(None) == "nothing"
    assert ALGORITHMS["fedper"].describe_client_state(None) == "its head"
    lg = ALGORITHMS["lgfedavg"]
    assert "global_layers=first" in lg.describe_client_state(lg.Hyperparams(global_layers="first"))


@pytest.mark.parametrize("algo, hp, expected", [
    ("fedavg", {}, "none"),
    ("fedbabu", {"finetune_epochs": 7}, "fine-tune 7 epochs"),
])
def test_the_summary_records_the_resolved_test_time_adaptation(algo, hp, expected):
    engine = make_engine(small_config(algo=algo, rounds=1), **hp)
    assert engine.run().summary["eval_adapt"].startswith(expected)

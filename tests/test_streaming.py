"""Streaming aggregation: uploads are folded into a running mean as they arrive, so a round holds
one model, not one upload per sampled client, and the result is bit-identical to aggregating the
collected list (the path an algorithm that overrides `aggregate` still takes)."""

import weakref

import pytest
import torch

from algorithms.fedavg import FedAvg
from algorithms.flute import LABELS, nc2_term
from helpers import digits, make_engine, metrics, small_config, states_equal
from pflbench.core.algorithm import Upload
from pflbench.core.engine import Engine
from pflbench.core.partition import partition
from pflbench.core.registry import ALGORITHMS, load_algorithms
from pflbench.core.state import RunningMean, weighted_mean
from pflbench.experiments.runner import partition_spec

load_algorithms()

# the algorithms whose aggregation was converted from a list to the streaming hooks
CONVERTED = ("fedselect", "floco", "flute", "perfedavg", "pfedme")
# hyperparameters that make a 2-round run exercise an algorithm's own aggregation
EXERCISE = {"fedselect": {"grow_every": 1, "p": 0.5}, "floco": {"tau": 1}}


def collect_list(algo):
    """Force the collected-list path: an `aggregate` replaced on the instance (as the old engine
    always did: hold every upload, aggregate at the end). Returns the lengths of the lists seen."""
    original, sizes = algo.aggregate, []

    def aggregate(uploads, global_state):
        sizes.append(len(uploads))
        return original(uploads, global_state)

    algo.aggregate = aggregate
    return sizes


def list_mean_before_streaming(states, weights):
    """The list mean as `weighted_mean` computed it before streaming: scales normalized first,
    then one running sum per tensor over the states in order (kept here as the reference)."""
    total = float(sum(weights))
    scale = [w / total for w in weights]
    mean = {}
    for key in states[0]:
        acc = states[0][key] * scale[0]
        for state, s in zip(states[1:], scale[1:]):
            acc.add_(state[key], alpha=s)
        mean[key] = acc
    return mean


def random_states(n, gen):
    return [{"w": torch.randn(7, 5, generator=gen), "b": torch.randn(5, generator=gen)} for _ in range(n)]


# -- the running mean ------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[37, 12, 80, 5, 61], [1.0] * 6, [0.3, 2.7, 1e-3, 9.1]])
def test_running_mean_is_bit_identical_to_the_list_mean(weights):
    gen = torch.Generator().manual_seed(len(weights))
    states = random_states(len(weights), gen)
    running = RunningMean(sum(weights))
    for state, w in zip(states, weights):
        running.add(state, w)
    expected = list_mean_before_streaming(states, weights)
    assert states_equal(running.result(), expected)
    assert states_equal(weighted_mean(states, weights), expected)


def test_running_mean_averages_a_tensor_over_the_states_that_carry_it():
    gen = torch.Generator().manual_seed(0)
    states = random_states(3, gen)
    del states[0]["b"]
    weights = [10, 20, 30]
    mean = weighted_mean(states, weights)
    assert states_equal({"w": mean["w"]}, list_mean_before_streaming(states, weights))
    # within one rounding of the mean over the two states that sent "b"
    direct = (20 * states[1]["b"].double() + 30 * states[2]["b"].double()) / 50
    torch.testing.assert_close(mean["b"], direct.float(), rtol=2e-7, atol=0)
    assert weighted_mean([], []) == {}


def test_tensors_nobody_sent_stay_as_they_were():
    engine = make_engine(small_config(algo="fedavg"))
    algo, g = engine.algo, engine.global_state
    acc = algo.begin_aggregation(g, {0: 5, 1: 7})
    gen = torch.Generator().manual_seed(0)
    for cid in (0, 1):
        algo.accumulate(acc, Upload(cid, 5 + 2 * cid, {"head.bias": torch.randn(10, generator=gen)}))
    out = algo.finish_aggregation(acc, g)
    assert all(out[k] is g[k] for k in g if k != "head.bias")
    assert not torch.equal(out["head.bias"], g["head.bias"])


# -- the engine: streaming and the collected list agree, for every algorithm -----------------------
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_streaming_gives_the_same_run_as_the_collected_list(algo):
    config = small_config(algo=algo, rounds=2, join_ratio=0.5)
    streamed = make_engine(config, **EXERCISE.get(algo, {}))
    listed = make_engine(config, **EXERCISE.get(algo, {}))
    sizes = collect_list(listed.algo)
    assert not listed.algo.streams_aggregation()
    a, b = streamed.run(), listed.run()
    assert sizes == [3, 3]
    assert metrics(a) == metrics(b)  # exactly: the same arithmetic in the same order
    assert states_equal(streamed.global_state, listed.global_state)


def test_fedavg_and_the_converted_algorithms_stream():
    for name in ("fedavg", *CONVERTED):
        engine = make_engine(small_config(algo=name, rounds=1))
        assert engine.algo.streams_aggregation(), name


def test_an_algorithm_that_overrides_aggregate_gets_every_upload():
    class WholeListFedAvg(FedAvg):
        seen: list[int] = []

        def aggregate(self, uploads, global_state):
            self.seen.append(len(uploads))
            return super().aggregate(uploads, global_state)

    config = small_config(algo="fedavg", rounds=2)
    splits = partition(digits().y.numpy(), partition_spec(config))
    engine = Engine(config, digits(), splits, WholeListFedAvg, FedAvg.Hyperparams(), torch.device("cpu"))
    assert not engine.algo.streams_aggregation()
    result = engine.run()
    assert WholeListFedAvg.seen == [6, 6]
    assert metrics(result) == metrics(make_engine(config).run())


# -- memory: what a round holds does not grow with the clients sampled ----------------------------
def uploads_alive_during_training(engine):
    """Before each client trains, how many earlier uploads of the round are still alive."""
    algo, alive, counts = engine.algo, [], []
    upload, local_train = algo.upload, algo.local_train

    def spy_upload(cid, trained):
        payload = upload(cid, trained)
        alive.append([weakref.ref(t) for t in payload.values()])
        return payload

    def spy_train(cid, model, round_):
        counts.append(sum(any(ref() is not None for ref in refs) for refs in alive))
        return local_train(cid, model, round_)

    algo.upload, algo.local_train = spy_upload, spy_train
    return counts


@pytest.mark.parametrize("clients", [4, 12])
def test_a_fedavg_round_holds_no_earlier_upload_whatever_the_clients_sampled(clients):
    streamed = make_engine(small_config(algo="fedavg", clients=clients, rounds=1))
    counts = uploads_alive_during_training(streamed)
    streamed.run()
    assert len(counts) == clients and max(counts) == 0
    listed = make_engine(small_config(algo="fedavg", clients=clients, rounds=1))
    collect_list(listed.algo)
    counts = uploads_alive_during_training(listed)
    listed.run()
    assert counts == list(range(clients))  # the probe works: the list keeps every upload


# -- FLUTE: the server step taken per upload is the step on the stacked heads ---------------------
def test_flute_per_upload_server_step_equals_the_step_on_all_heads_at_once():
    engine = make_engine(small_config(algo="flute", rounds=1))
    algo = engine.algo
    gen = torch.Generator().manual_seed(0)
    heads = [torch.randn(10, 200, generator=gen) for _ in range(4)]
    labels = [torch.rand(10, generator=gen) < 0.6 for _ in range(4)]
    for cid in range(4):
        algo.kept[cid] = {}
        algo.server_step(Upload(cid, 1, {"head.weight": heads[cid], LABELS: labels[cid]}), 4)
    weights = torch.stack(heads).requires_grad_(True)
    loss = sum(nc2_term(weights[i], labels[i]) for i in range(4)) / 4
    (grad,) = torch.autograd.grad(loss, weights)
    stepped = weights.detach() - algo.hp.server_lr * grad
    for cid in range(4):
        assert torch.equal(algo.kept[cid]["head.weight"], stepped[cid])

"""The round loop: equivalence with plain SGD, communication counts, determinism, sampling."""

import torch
import torch.nn.functional as F

from helpers import digits, digits16, make_engine, small_config, states_equal, without_timing
from pflbench.core.engine import client_schedule
from pflbench.core.models import build_model
from pflbench.core.state import get_state, nbytes


def test_fedavg_with_one_client_equals_plain_sgd_on_its_data():
    config = small_config(algo="fedavg", clients=1, partition="iid", rounds=3, local_epochs=2,
                          momentum=0.9, weight_decay=1e-4)
    engine = make_engine(config)
    engine.run()

    data = digits()
    torch.manual_seed(config.seed)
    model = build_model("mlp", data.input_shape, data.num_classes)
    for round_ in range(1, config.rounds + 1):
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
        for xb, yb in engine.trainer.batches(0, config.local_epochs, round_):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    assert states_equal(engine.global_state, get_state(model))


def test_batches_cover_each_training_sample_once_per_epoch():
    engine = make_engine(small_config(batch_size=7))
    batches = list(engine.trainer.batch_indices(2, epochs=2, round_=1))
    train = engine.clients[2].train
    per_epoch = -(-len(train) // 7)
    assert len(batches) == 2 * per_epoch
    for epoch in range(2):
        seen = torch.cat(batches[epoch * per_epoch:(epoch + 1) * per_epoch])
        assert torch.equal(seen.sort().values, train.sort().values)
    first, second = torch.cat(batches[:per_epoch]), torch.cat(batches[per_epoch:])
    assert not torch.equal(first, second)


def test_local_communicates_nothing_and_keeps_each_clients_model():
    engine = make_engine(small_config(algo="local"))
    init = {k: v.clone() for k, v in engine.global_state.items()}
    result = engine.run()
    assert result.summary["comm_up_bytes"] == 0 and result.summary["comm_down_bytes"] == 0
    assert states_equal(engine.global_state, init)
    kept = engine.algo.kept
    assert set(kept) == set(range(6)) and not states_equal(kept[0], kept[1])
    assert states_equal(engine.algo.eval_state(3, engine.global_state), kept[3])


def test_fedavg_counts_the_whole_model_both_ways():
    config = small_config(algo="fedavg", clients=6, join_ratio=0.5, rounds=4)
    engine = make_engine(config)
    result = engine.run()
    model_bytes = nbytes(engine.global_state)
    assert result.summary["comm_up_bytes"] == 4 * 3 * model_bytes
    assert result.summary["comm_down_bytes"] == 4 * 3 * model_bytes


def test_fixed_seed_gives_identical_metrics_twice():
    config = small_config(algo="fedavg", join_ratio=0.5, finetune_epochs=1)
    a, b = make_engine(config).run(), make_engine(config).run()
    assert without_timing(a.rounds) == without_timing(b.rounds)
    assert a.clients == b.clients
    c = make_engine(config.replace(seed=1)).run()
    assert without_timing(a.rounds) != without_timing(c.rounds)


def test_client_sampling_is_fixed_per_seed_and_samples_without_replacement():
    schedule = client_schedule(seed=3, num_clients=100, per_round=10, rounds=50)
    assert schedule == client_schedule(seed=3, num_clients=100, per_round=10, rounds=50)
    assert all(len(set(r)) == 10 and all(0 <= c < 100 for c in r) for r in schedule)
    assert schedule != client_schedule(seed=4, num_clients=100, per_round=10, rounds=50)
    assert make_engine(small_config(algo="fedavg", join_ratio=0.5)).schedule == \
        make_engine(small_config(algo="local", join_ratio=0.5)).schedule


def test_evaluation_rows_and_pooled_accuracy():
    config = small_config(algo="fedavg", rounds=4, eval_every=2, finetune_epochs=1)
    result = make_engine(config).run()
    assert [r["round"] for r in result.rounds] == [2, 4]
    last = [r for r in result.clients if r["round"] == 4]
    assert len(last) == 6
    pooled = 100 * sum(r["correct"] for r in last) / sum(r["n_test"] for r in last)
    assert result.summary["acc"] == pooled
    assert result.summary["best_acc"] == max(r["acc"] for r in result.rounds)
    assert "acc_ft" in result.summary and "acc_client_p10_ft" in result.summary


def test_conv_model_runs_in_channels_last():
    config = small_config(algo="fedavg", model="fedavgcnn", rounds=1)
    big = digits16()
    engine = make_engine(config, data=big)
    assert engine.trainer.data.x.is_contiguous(memory_format=torch.channels_last)
    assert engine.run().summary["acc"] > 0

"""Published numbers appear beside ours only for cells run under the FedOBP paper's protocol."""

import pandas as pd

from pflbench.experiments.presets import PRESETS
from pflbench.analysis.published import PROTOCOL, attach_published, is_paper_protocol, load_published


def test_the_fedobp_preset_is_the_paper_protocol_and_other_settings_are_not():
    preset = {k: v for k, v in PRESETS["fedobp"].items() if k not in ("datasets", "alphas", "seeds")}
    config = {"partition": "dirichlet", "weight_decay": 0.0, **preset}
    assert is_paper_protocol(config)
    assert not is_paper_protocol({**config, "rounds": 30})
    assert not is_paper_protocol({**config, "local_epochs": 2})
    assert set(PROTOCOL) - {"partition", "weight_decay"} == set(preset)


def test_the_shipped_table_has_both_sources():
    published = load_published()
    assert set(published["source"]) == {"authors_logs_2025_01", "fedobp_paper_2026"}
    row = published[(published["dataset"] == "cifar10") & (published["alpha"] == 0.1)
                    & (published["algo"] == "fedper")]
    assert row["acc"].tolist() == [85.73]


def test_published_numbers_and_differences_only_on_paper_protocol_rows():
    board = pd.DataFrame({
        "dataset": ["cifar10", "cifar10", "cifar10", "fmnist"],
        "alpha": [0.1, 0.1, 0.5, 0.1],
        "algo": ["fedobp", "fedper", "fedper", "fedper"],
        "best_acc": [88.0, 85.0, 60.0, 95.0],
        "paper_protocol": [True, True, False, False],
    })
    out = attach_published(board)
    assert out["published_authors_logs_2025_01"].tolist()[:2] == [87.75, 85.73]
    assert out["published_authors_logs_2025_01"].iloc[2:].isna().all()  # other protocols: never
    assert round(out["best_acc_vs_authors_logs_2025_01"].iloc[1], 6) == round(85.0 - 85.73, 6)
    assert out["published_fedobp_paper_2026"].iloc[0] == 87.02
    assert out["published_fedobp_paper_2026"].iloc[1:].isna().all()  # the paper lists FedOBP only


def test_no_paper_protocol_rows_means_no_published_columns():
    board = pd.DataFrame({"dataset": ["fmnist"], "alpha": [0.1], "algo": ["fedper"], "best_acc": [95.0],
                          "paper_protocol": [False]})
    assert list(attach_published(board).columns) == list(board.columns)

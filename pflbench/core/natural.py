"""The natural partition: clients given by the dataset itself (a FEMNIST writer, a Shakespeare
speaker), not drawn by a scheme.

A dataset `.npz` may carry two more arrays, `client_train` and `client_test`: one integer client id
per sample of `x_train` and `x_test` (see README, "Natural partitions"). A client's local training
set is its samples of `x_train` and its test set its samples of `x_test`, as LEAF splits per user;
`--test-ratio` does not apply. Only clients with at least one sample on each side are eligible, and
`--clients N` takes N of them: the N largest (`--natural-pick largest`, ties to the smaller id) or a
seeded uniform sample (`--natural-pick sample`). Clients are numbered in increasing id order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pflbench.errors import UserError

NATURAL_PICKS = ("largest", "sample")


@dataclass(frozen=True)
class NaturalClients:
    """Per pool sample (train then test, as the dataset pool is merged): its client id, and whether
    it comes from the official test split."""

    ids: np.ndarray
    is_test: np.ndarray


def natural_clients(ids: NaturalClients, num_clients: int, pick: str, rng: np.random.Generator
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) pool indices of each chosen client, in increasing client id order."""
    if pick not in NATURAL_PICKS:
        raise UserError(f"unknown --natural-pick '{pick}'; choose one of {', '.join(NATURAL_PICKS)}")
    keys, inverse = np.unique(ids.ids, return_inverse=True)
    train_n = np.bincount(inverse[~ids.is_test], minlength=len(keys))
    test_n = np.bincount(inverse[ids.is_test], minlength=len(keys))
    eligible = np.flatnonzero((train_n > 0) & (test_n > 0))
    if num_clients > len(eligible):
        raise UserError(f"--clients {num_clients} but the dataset's natural partition has only "
                        f"{len(eligible)} clients with both training and test samples; pass "
                        f"--clients {len(eligible)} or fewer")
    if pick == "largest":
        # stable sort by size, descending: ties keep the smaller id first
        by_size = eligible[np.argsort(-(train_n + test_n)[eligible], kind="stable")]
        chosen = np.sort(by_size[:num_clients])
    else:
        chosen = np.sort(rng.choice(eligible, num_clients, replace=False))
    order = np.argsort(inverse, kind="stable")  # pool indices grouped by client, ascending within
    starts = np.concatenate([[0], np.cumsum(train_n + test_n)])
    clients = []
    for i in chosen:
        own = order[starts[i]:starts[i + 1]]
        test = ids.is_test[own]
        clients.append((own[~test], own[test]))
    return clients

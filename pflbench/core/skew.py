"""How heterogeneous a partition is, measured, so partitions of different schemes compare on one axis.

Alpha says how a Dirichlet partition was drawn, not how skewed the result is, and says nothing of
quantity skew or a natural partition. Every run records these figures of its partition:

- `skew_hellinger`: the mean over clients of the Hellinger distance between the client's label
  distribution and the pool's (0: identical, 1: disjoint supports);
- `skew_js`: the same with the Jensen-Shannon distance (scipy's `jensenshannon`, base 2, so also in
  [0, 1]);
- `size_cv`: the coefficient of variation (population standard deviation over mean) of the clients'
  sizes (0: equal sizes).

A client's distribution counts all its samples (train, test and validation): the partition dealt
them together.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import jensenshannon


def skew_measures(counts: np.ndarray) -> dict[str, float]:
    """The three figures from per-client class counts ([client, class], or [client, split, class],
    whose splits are summed)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 3:
        counts = counts.sum(axis=1)
    sizes = counts.sum(axis=1)
    clients = counts / sizes[:, None]
    pool = counts.sum(axis=0) / counts.sum()
    hellinger = np.sqrt(0.5 * ((np.sqrt(clients) - np.sqrt(pool)) ** 2).sum(axis=1))
    js = jensenshannon(clients, np.broadcast_to(pool, clients.shape), base=2, axis=1)
    return {"skew_hellinger": float(hellinger.mean()), "skew_js": float(np.mean(js)),
            "size_cv": float(sizes.std() / sizes.mean())}

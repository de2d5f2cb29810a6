"""How a labelled pool is dealt to clients: one function per partition scheme.

Each scheme is `(labels, spec, rng) -> one index array per client`, drawing only from the seeded
numpy Generator it is given, so a partition is a pure function of its key. Schemes that can fail by
chance (a Dirichlet draw leaving a client too few samples) retry a bounded number of times and then
fail with advice instead of looping forever, as Flower Datasets' DirichletPartitioner does.

- `dirichlet`: label skew, per class Dirichlet(alpha) proportions over clients.
- `exdir`: extended Dirichlet, each client first gets `classes_per_client` classes, then
  Dirichlet(alpha) proportions within them.
- `shards`: McMahan et al.'s pathological split.
- `iid`: equal-sized uniform shares.
- `quantity`: quantity skew, client sizes drawn from a log-normal or a power law, labels IID
  within a client.

The natural partition (client ids carried by the dataset) is :mod:`pflbench.core.natural`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from pflbench.errors import UserError

if TYPE_CHECKING:
    from pflbench.core.partition import PartitionSpec

MAX_DIRICHLET_TRIES = 100
ALPHA_SCHEMES = ("dirichlet", "exdir")  # the schemes that alpha parameterizes; the others ignore it
SIZE_DISTRIBUTIONS = ("lognormal", "powerlaw")
Scheme = Callable[[np.ndarray, "PartitionSpec", np.random.Generator], list[np.ndarray]]


def _deal_by_class(by_class: list[np.ndarray], holders: list[np.ndarray], spec: "PartitionSpec",
                   rng: np.random.Generator, total: int) -> tuple[list[np.ndarray], int]:
    """One Dirichlet draw: class k's samples go to the clients in `holders[k]` in Dirichlet(alpha)
    proportions. As in FedML and FL-bench (whose split the FedOBP authors used), a client that
    already holds its fair share (pool size / clients) gets nothing of the classes dealt after
    that, which keeps the very small and very large clients of a raw Dirichlet draw in check.
    Returns the clients' index arrays and the smallest client's size."""
    fair_share = total / spec.num_clients
    shares: list[list[np.ndarray]] = [[] for _ in range(spec.num_clients)]
    sizes = np.zeros(spec.num_clients, dtype=np.int64)
    for idx, clients in zip(by_class, holders):
        idx = rng.permutation(idx)
        proportions = rng.dirichlet(np.full(len(clients), spec.alpha))
        open_clients = proportions * (sizes[clients] < fair_share)
        if open_clients.sum() > 0:
            proportions = open_clients / open_clients.sum()
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for client, part in zip(clients, np.split(idx, cuts)):
            shares[client].append(part)
            sizes[client] += len(part)
    dealt = [np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64) for parts in shares]
    return dealt, int(sizes.min())


def _deal_until_large_enough(by_class: list[np.ndarray], holders: list[np.ndarray], spec: "PartitionSpec",
                             rng: np.random.Generator, total: int, what: str, advice: str) -> list[np.ndarray]:
    """`_deal_by_class` until every client has `min_samples` samples, at most MAX_DIRICHLET_TRIES
    times; then a UserError naming `what` was drawn and the `advice`."""
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        dealt, smallest = _deal_by_class(by_class, holders, spec, rng, total)
        if smallest >= spec.min_samples:
            return dealt
    raise UserError(f"{what} left a client with {smallest} < --min-samples {spec.min_samples} samples "
                    f"after {MAX_DIRICHLET_TRIES} tries; {advice}")


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def dirichlet(labels: np.ndarray, spec: "PartitionSpec", rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, Dirichlet(alpha) proportions over all clients; retried until every client has
    at least `min_samples` samples."""
    by_class = _by_class(labels)
    everyone = [np.arange(spec.num_clients)] * len(by_class)
    return _deal_until_large_enough(by_class, everyone, spec, rng, len(labels),
                                    f"Dirichlet(alpha={spec.alpha}) over {spec.num_clients} clients",
                                    "use a larger --alpha, fewer --clients or a smaller --min-samples")


def exdir(labels: np.ndarray, spec: "PartitionSpec", rng: np.random.Generator) -> list[np.ndarray]:
    """Extended Dirichlet (Li et al., "Convergence and Heterogeneity in Federated Learning...",
    arXiv:2311.03154; PFLlib's `exdir`): every client draws `classes_per_client` distinct classes,
    redrawn until each class is held by at least max(C * clients / classes / 2, 1) clients (PFLlib's
    threshold); then each class is dealt by Dirichlet(alpha) over the clients holding it (with the
    fair-share cap of `dirichlet`), retried until every client has `min_samples` samples.

    PFLlib retries both stages without bound; here each is bounded and fails with advice."""
    by_class = _by_class(labels)
    num_classes, c = len(by_class), spec.classes_per_client
    need = max(c * spec.num_clients // num_classes // 2, 1)
    for _ in range(MAX_DIRICHLET_TRIES):
        held = np.stack([rng.choice(num_classes, c, replace=False) for _ in range(spec.num_clients)])
        holders = [np.flatnonzero((held == k).any(axis=1)) for k in range(num_classes)]
        if min(len(h) for h in holders) >= need:
            break
    else:
        raise UserError(f"exdir could not give every class {need} of {spec.num_clients} clients with "
                        f"--classes-per-client {c} in {MAX_DIRICHLET_TRIES} tries; use more clients or "
                        "a larger --classes-per-client")
    return _deal_until_large_enough(by_class, holders, spec, rng, len(labels),
                                    f"exdir(alpha={spec.alpha}, {c} classes per client)",
                                    "use a larger --alpha or --classes-per-client, fewer --clients or a "
                                    "smaller --min-samples")


def shards(labels: np.ndarray, spec: "PartitionSpec", rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into equal shards, deal
    `classes_per_client` shards to each client."""
    num_shards = spec.num_clients * spec.classes_per_client
    if num_shards > len(labels):
        raise UserError(f"{spec.num_clients} clients x {spec.classes_per_client} classes per client "
                        f"needs {num_shards} shards but there are only {len(labels)} samples")
    order = np.lexsort((rng.permutation(len(labels)), labels))
    pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(spec.num_clients, spec.classes_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def iid(labels: np.ndarray, spec: "PartitionSpec", rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), spec.num_clients)]


def quantity_sizes(total: int, spec: "PartitionSpec", rng: np.random.Generator) -> np.ndarray:
    """Client sizes summing to `total`, each at least `min_samples`, the rest shared in proportion
    to weights drawn from the size distribution (largest remainders make the sum exact).

    `sigma` is the spread for both distributions, so a larger sigma is a stronger skew either way:
    lognormal: weights exp(N(0, sigma^2)) (FedLab's unbalanced split, Zeng et al. 2021, draws
    client sizes from a log-normal the same way); powerlaw: weights Pareto with shape 1 / sigma
    (heavier tail as sigma grows; LEAF's and FedProx's synthetic data follow a power law)."""
    n = spec.num_clients
    if spec.size_dist == "lognormal":
        weights = rng.lognormal(0.0, spec.sigma, n)
    else:
        weights = rng.pareto(1.0 / spec.sigma, n) + 1.0
    spare = total - n * spec.min_samples
    exact = spare * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = spare - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:short]] += 1
    return sizes + spec.min_samples


def quantity(labels: np.ndarray, spec: "PartitionSpec", rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew: sizes from `quantity_sizes`, each client a uniform random share of the pool
    (so its labels are IID and only its size differs)."""
    sizes = quantity_sizes(len(labels), spec, rng)
    order = rng.permutation(len(labels))
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


SCHEMES: dict[str, Scheme] = {"dirichlet": dirichlet, "exdir": exdir, "shards": shards, "iid": iid,
                              "quantity": quantity}

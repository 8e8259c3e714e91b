"""Non-IID client partitions of a labelled data set, as pure functions.

Federated clients rarely hold the same label mix. The usual way to emulate this (Hsu et al. 2019,
"Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification") is
to draw, for every class, the share each client gets from a symmetric Dirichlet(α): small α gives
each client a few dominant labels, large α tends to an IID split.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from idla.errors import ConfigError

IndexArray = npt.NDArray[np.int64]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[IndexArray]:
    """Split the indices of ``labels`` among ``num_clients`` with Dirichlet(α) label skew.

    For each class c the class's indices are shuffled and cut by proportions p ~ Dir(α·1) over
    the clients. Every index lands in exactly one client; a client left empty takes one index
    from the largest client, so every client holds at least one sample.

    Args:
        labels: Integer class of each sample, shape (n,).
        num_clients: Number of clients, 1 ≤ num_clients ≤ n.
        alpha: Concentration α > 0 (0.5 is a common non-IID setting; 100 is near IID).
        rng: Source of randomness (the split is a function of its state).

    Returns:
        One sorted int64 index array per client.

    Cost: O(n + C·K) time for n samples, C classes, K clients.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"--alpha (Dirichlet concentration) must be > 0, got {alpha}")
    if num_clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {num_clients}")
    if num_clients > labels.size:
        raise ConfigError(
            f"--clients {num_clients} is more than the {labels.size} training samples; "
            "every client needs at least one"
        )
    members: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        rng.shuffle(indices)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * indices.size).astype(np.int64)
        for client, part in enumerate(np.split(indices, cuts)):
            members[client].extend(int(i) for i in part)
    for client in range(num_clients):
        if not members[client]:
            donor = max(range(num_clients), key=lambda c: len(members[c]))
            members[client].append(members[donor].pop())
    return [np.sort(np.asarray(m, dtype=np.int64)) for m in members]


def label_skew(
    labels: np.ndarray, partitions: list[IndexArray], num_classes: int | None = None
) -> float:
    """Mean total-variation distance between each client's label mix and the global one.

    0 for a perfectly stratified split; 1 − 1/C with C balanced classes when every client holds
    a single class.
    Clients are weighted equally. Cost: O(n + K·C).
    """
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    overall = np.bincount(labels, minlength=classes) / labels.size
    distances = []
    for part in partitions:
        if part.size == 0:
            continue
        mix = np.bincount(labels[part], minlength=classes) / part.size
        distances.append(0.5 * float(np.abs(mix - overall).sum()))
    return float(np.mean(distances)) if distances else 0.0

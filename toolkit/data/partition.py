"""Splitting a training set across devices: IID, Dirichlet label skew, or label shards.

Deterministic by seed, so an agent that computes its own share and the server that
computes everybody's agree without exchanging indices.
"""

from __future__ import annotations

import numpy as np

from toolkit.errors import UserError


def parse_partition(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit()):
        raise UserError(f"partition {text!r} is not of the form I/N (e.g. 0/4)")
    i, n = int(index), int(count)
    if n < 1 or not 0 <= i < n:
        raise UserError(f"partition {text!r} is out of range: I must be 0..N-1 and N at least 1")
    return i, n


def parse_scheme(text: str | None) -> tuple[str, float]:
    """``None``/``iid`` -> ("iid", 0); ``dirichlet:0.5``; ``shards:2``."""
    if text is None or text == "iid":
        return "iid", 0.0
    name, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if name == "dirichlet" and number > 0:
        return name, number
    if name == "shards" and number >= 1 and number == int(number):
        return name, number
    raise UserError(f"non-IID scheme {text!r}: use dirichlet:ALPHA (ALPHA > 0) or shards:K (K >= 1)")


def partition_indices(labels: np.ndarray, num_devices: int, scheme: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Indices of the training samples of each device; every sample goes to exactly one device."""
    kind, value = parse_scheme(scheme)
    rng = np.random.default_rng(seed + 7919)  # decoupled from the train/test split's stream
    labels = np.asarray(labels)
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_devices)]
    if kind == "dirichlet":
        return _dirichlet(labels, num_devices, value, rng)
    return _shards(labels, num_devices, int(value), rng)


def _dirichlet(labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, shares across devices drawn from Dir(alpha); redrawn until every device has data."""
    minimum = max(1, min(10, len(labels) // (num_devices * 10)))
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_devices, alpha))
            bounds = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for device, chunk in enumerate(np.split(members, bounds)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= minimum:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise UserError(f"dirichlet partition could not give {num_devices} devices {minimum}+ samples each")


def _shards(labels: np.ndarray, num_devices: int, per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into num_devices*K shards, give each device K random shards (McMahan et al.)."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_devices * per_device)
    picks = rng.permutation(len(shards))
    return [
        np.sort(np.concatenate([shards[s] for s in picks[d * per_device : (d + 1) * per_device]]))
        for d in range(num_devices)
    ]

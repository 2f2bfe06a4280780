"""Blending the probabilities of several experiments (an ensemble's members).

An ensemble's members each store their out-of-fold and test probabilities as uint8
levels (``probstore``). A blend is a weighted mean of those levels with weights that
sum to 1, rounded back to uint8 (``blend_levels``); the tuner scores it and prediction
applies it with the same function, so the tuned OOF score is what the blend does. The
candidate weights are every point of the simplex on a grid of ``step``
(``simplex_weights``); each member alone (a one-hot vector) is among them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# Slack for float error when 1 / step is checked to be a whole number.
_STEP_EPS = 1e-9


def simplex_weights(n_members: int, step: float) -> np.ndarray:
    """(K, n_members) float64: every weight vector of multiples of ``step`` summing to 1.

    Ordered lexicographically from the last member's full weight to the first's, so
    one-hot vectors and equal weights are included; ``1 / step`` must be a whole number.
    """
    if n_members < 1:
        raise ValueError(f"an ensemble needs at least one member; got {n_members}")
    if not 0 < step <= 1:
        raise ValueError(f"ensemble.weight_step must be in (0, 1]; got {step}")
    parts = round(1 / step)
    if abs(parts * step - 1) > _STEP_EPS:
        raise ValueError(f"ensemble.weight_step must divide 1 (e.g. 0.1, 0.25); got {step}")
    rows = [
        combo
        for combo in itertools.product(range(parts + 1), repeat=n_members)
        if sum(combo) == parts
    ]
    return np.array(rows, dtype=np.float64) / parts


def one_hot_index(weights: np.ndarray, member: int) -> int:
    """The row of ``weights`` (``simplex_weights``) that is member ``member`` alone."""
    rows = np.flatnonzero(weights[:, member] == 1.0)
    if not rows.size:
        raise ValueError(f"weights hold no row for member {member} alone")
    return int(rows[0])


def blend_levels(levels: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted mean of uint8 prob levels, per class, rounded to uint8.

    ``levels`` holds one (C, H, W) uint8 array per member (the same shape); ``weights``
    is (M,) for every class alike or (C, M) per class, each row summing to 1. A one-hot
    row returns that member's levels exactly.
    """
    if not levels:
        raise ValueError("levels must hold one array per member; got none")
    shape = levels[0].shape
    for m, array in enumerate(levels):
        if array.dtype != np.uint8 or array.shape != shape:
            raise ValueError(
                f"member {m}'s levels must be uint8 {shape}; got {array.dtype} {array.shape}"
            )
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = np.broadcast_to(w, (shape[0], len(levels)))
    if w.shape != (shape[0], len(levels)):
        raise ValueError(
            f"weights must be ({len(levels)},) or ({shape[0]}, {len(levels)}); got {w.shape}"
        )
    if not np.allclose(w.sum(axis=1), 1.0) or (w < 0).any():
        raise ValueError(f"each row of weights must be >= 0 and sum to 1; got {w.tolist()}")
    total = np.zeros(shape, dtype=np.float32)
    for m, array in enumerate(levels):
        total += w[:, m].astype(np.float32)[:, None, None] * array
    return np.rint(total).clip(0, 255).astype(np.uint8)

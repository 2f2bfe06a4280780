"""Test-time augmentation: named forward views, their exact inverses, and merging.

A view is a named, exactly invertible transform of a batch (N, H, W, C): flips,
quarter turns, the transpose and cyclic pixel shifts ``shift:<dy>,<dx>`` (``np.roll``,
so nothing is lost and the inverse is exact). The model predicts all views of one
orientation in one call (``stack_views``); its outputs are mapped back and merged
(``merge_views``). On a non-square batch the quarter turns and the transpose give
(N, W, H, C): a fully convolutional model runs them as a second call at the swapped
shape (``predict_views``). ``merge_arrays`` is the same merge, used again to average folds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

logger = logging.getLogger(__name__)

# Name -> (number of quarter turns, flip H, flip W, transpose) applied in that order.
_GEOMETRIC: dict[str, tuple[int, bool, bool, bool]] = {
    "identity": (0, False, False, False),
    "hflip": (0, False, True, False),
    "vflip": (0, True, False, False),
    "hvflip": (0, True, True, False),
    "rot90": (1, False, False, False),
    "rot180": (2, False, False, False),
    "rot270": (3, False, False, False),
    "transpose": (0, False, False, True),
}
VIEWS: tuple[str, ...] = tuple(_GEOMETRIC)
Merge = Literal["mean", "gmean", "max"]
MERGES: tuple[str, ...] = get_args(Merge)
# Floor applied before the log of a geometric mean, so a zero probability stays finite.
GMEAN_EPS = 1e-7

_SHIFT = re.compile(r"^shift:(-?\d+),(-?\d+)$")


@dataclass(frozen=True)
class View:
    """One parsed view: a geometric transform or a cyclic shift by (dy, dx) pixels."""

    name: str
    quarter_turns: int = 0
    flip_h: bool = False
    flip_w: bool = False
    transpose: bool = False
    dy: int = 0
    dx: int = 0

    @property
    def swaps_axes(self) -> bool:
        """True where the view swaps H and W: (N, H, W, C) becomes (N, W, H, C)."""
        return self.transpose or self.quarter_turns % 2 == 1


def parse_view(name: str) -> View:
    """Parse a view name: one of ``VIEWS`` or ``shift:<dy>,<dx>`` with integer pixels."""
    if name in _GEOMETRIC:
        turns, flip_h, flip_w, transpose = _GEOMETRIC[name]
        return View(name, turns, flip_h, flip_w, transpose)
    match = _SHIFT.match(name)
    if match is None:
        raise ValueError(
            f"view must be one of {', '.join(VIEWS)} or 'shift:<dy>,<dx>' "
            f"(integers, e.g. 'shift:0,8'); got {name!r}"
        )
    return View(name, dy=int(match.group(1)), dx=int(match.group(2)))


def valid_views(names: Sequence[str], height: int, width: int, rotate: bool = False) -> list[str]:
    """Parse ``names`` and keep those usable on (height, width) inputs, in order.

    The views that swap H and W are kept when ``rotate`` (the model also runs at
    (width, height)) or the input is square; otherwise they are dropped (logged).
    Duplicate names are an error, since they would silently weight one view twice.
    """
    seen: set[str] = set()
    kept: list[str] = []
    for name in names:
        if name in seen:
            raise ValueError(f"views must not repeat; got {name!r} twice in {list(names)}")
        seen.add(name)
        if parse_view(name).swaps_axes and height != width and not rotate:
            logger.info(
                "TTA view %s dropped: inputs are %dx%d and the model has a fixed input shape",
                name,
                height,
                width,
            )
            continue
        kept.append(name)
    if not kept:
        raise ValueError(
            f"views must keep at least one view for {height}x{width}; got {list(names)}"
        )
    return kept


def _check_batch(batch: np.ndarray) -> None:
    if batch.ndim != 4:
        raise ValueError(f"batch must be (N, H, W, C); got shape {batch.shape}")


def apply_view(batch: np.ndarray, view: str) -> np.ndarray:
    """Transform a batch (N, H, W, C), any dtype, by the named view.

    The shape is kept, except that the views that swap H and W (``View.swaps_axes``)
    give (N, W, H, C).

    The result may share memory with ``batch`` (flips are numpy views); do not write
    into it.
    """
    parsed = parse_view(view)
    _check_batch(batch)
    out = batch
    if parsed.transpose:
        out = out.transpose(0, 2, 1, 3)
    if parsed.flip_h:
        out = out[:, ::-1]
    if parsed.flip_w:
        out = out[:, :, ::-1]
    if parsed.quarter_turns:
        out = np.rot90(out, k=parsed.quarter_turns, axes=(1, 2))
    if parsed.dy or parsed.dx:
        out = np.roll(out, (parsed.dy, parsed.dx), axis=(1, 2))
    return out


def invert_view(batch: np.ndarray, view: str) -> np.ndarray:
    """Undo ``apply_view``: ``invert_view(apply_view(x, v), v)`` equals ``x`` exactly.

    ``batch`` is (N, H, W, C), any dtype; the result may share memory with it.
    """
    parsed = parse_view(view)
    _check_batch(batch)
    out = batch
    if parsed.dy or parsed.dx:
        out = np.roll(out, (-parsed.dy, -parsed.dx), axis=(1, 2))
    if parsed.quarter_turns:
        out = np.rot90(out, k=-parsed.quarter_turns, axes=(1, 2))
    if parsed.flip_w:
        out = out[:, :, ::-1]
    if parsed.flip_h:
        out = out[:, ::-1]
    if parsed.transpose:
        out = out.transpose(0, 2, 1, 3)
    return out


def orientation_groups(views: Sequence[str]) -> list[list[str]]:
    """``views`` split into those that keep (H, W) and those that swap it, each in order.

    Empty groups are left out. On a square batch both groups have the same shape, but
    they are still two groups, so one batch's calls do not depend on its shape.
    """
    keep = [v for v in views if not parse_view(v).swaps_axes]
    swap = [v for v in views if parse_view(v).swaps_axes]
    return [group for group in (keep, swap) if group]


def stack_views(batch: np.ndarray, views: Sequence[str]) -> np.ndarray:
    """All views of a batch (N, H, W, C) stacked view-major: (len(views) * N, H', W', C).

    Rows ``[i * N, (i + 1) * N)`` hold view ``views[i]``; same dtype as ``batch``. On a
    non-square batch the views must share one orientation (``orientation_groups``).
    """
    if not views:
        raise ValueError("views must name at least one view; got []")
    _check_batch(batch)
    if batch.shape[1] != batch.shape[2] and len(orientation_groups(views)) > 1:
        raise ValueError(
            f"views must share one orientation on a {batch.shape[1]}x{batch.shape[2]} batch "
            f"(split them with orientation_groups); got {list(views)}"
        )
    return np.concatenate([apply_view(batch, view) for view in views], axis=0)


def predict_views(
    predict: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    views: Sequence[str],
    how: str = "mean",
) -> np.ndarray:
    """Merged predictions of a batch (N, H, W, C_in) under every view: (N, H, W, C) float32.

    ``predict`` maps a stacked batch (M, H', W', C_in) to per-pixel outputs
    (M, H', W', C); it is called once per orientation group, so a non-square batch's
    quarter turns run as one call at (W, H). Each output is inverted, and the views are
    merged in the order given.
    """
    n = len(batch)
    inverted: dict[str, np.ndarray] = {}
    for group in orientation_groups(views):
        preds = predict(stack_views(batch, group))
        if len(preds) != len(group) * n:
            raise ValueError(
                f"predict must return one output per stacked image ({len(group) * n}); "
                f"got {len(preds)}"
            )
        for i, view in enumerate(group):
            inverted[view] = invert_view(preds[i * n : (i + 1) * n], view)
    return merge_arrays([inverted[view] for view in views], how)


def merge_arrays(arrays: Sequence[np.ndarray], how: str = "mean") -> np.ndarray:
    """Merge same-shaped prob arrays (e.g. (N, H, W, C) float in [0, 1]) into one float32.

    ``how``: ``mean`` (arithmetic), ``gmean`` (geometric, probs floored at
    ``GMEAN_EPS``) or ``max`` (elementwise). Accumulates one array at a time, so the
    memory is two arrays whatever ``len(arrays)`` is.
    """
    if how not in MERGES:
        raise ValueError(f"how must be one of {', '.join(MERGES)}; got {how!r}")
    if not arrays:
        raise ValueError("arrays must hold at least one array; got none")
    shape = arrays[0].shape
    total: np.ndarray | None = None
    for i, array in enumerate(arrays):
        if array.shape != shape:
            raise ValueError(f"arrays[{i}] must have shape {shape}; got {array.shape}")
        term = array.astype(np.float32)
        if how == "gmean":
            term = np.log(np.maximum(term, np.float32(GMEAN_EPS)))
        if total is None:
            total = term
        elif how == "max":
            np.maximum(total, term, out=total)
        else:
            total += term
    assert total is not None
    if how == "max":
        return total
    total /= np.float32(len(arrays))
    return np.exp(total) if how == "gmean" else total


def merge_views(preds: np.ndarray, views: Sequence[str], n: int, how: str = "mean") -> np.ndarray:
    """Invert each view of stacked predictions and merge them.

    ``preds`` is (len(views) * n, H', W', C), view-major as made by ``stack_views``
    (one orientation); returns (n, H, W, C) float32.
    """
    if preds.ndim != 4 or preds.shape[0] != len(views) * n:
        raise ValueError(
            f"preds must be (len(views) * n, H, W, C) = ({len(views) * n}, H, W, C); "
            f"got shape {preds.shape}"
        )
    return merge_arrays(
        [invert_view(preds[i * n : (i + 1) * n], view) for i, view in enumerate(views)], how
    )

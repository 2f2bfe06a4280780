"""Kaggle run-length encoding of binary masks.

The Kaggle convention: space-separated ``start length`` pairs, starts 1-indexed, pixels
numbered top to bottom then left to right (column-major), so pixel ``(row, col)`` of an
``(H, W)`` mask has number ``col * H + row + 1``.

Everything here is vectorised over pixels and runs; the only Python loops are over
whole masks and whole strings.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

# Characters that make up a well-formed RLE string; anything else sends the string to
# the slow path that finds and names the offending token.
_RLE_CHARS = b"0123456789 \t\n\r"
# No image has this many pixels; below it, sums of tokens stay far inside int64.
_MAX_TOKEN = 10**15
# Each thread keeps its own encode scratch arrays (see _Buffers).
_THREAD_STATE = threading.local()


def encode(mask: np.ndarray) -> str:
    """Encode a mask as a Kaggle RLE string.

    Args:
        mask: (H, W) array of any integer or bool dtype; nonzero pixels are foreground.

    Returns:
        ``"start length start length ..."`` with 1-indexed column-major starts, or
        ``""`` for an empty mask.
    """
    runs = _encode_runs(mask, _thread_buffers())
    return _format_ints(runs)


def encode_batch(masks: Iterable[np.ndarray]) -> list[str]:
    """Encode several masks, e.g. every class channel of a prediction.

    Same result as ``[encode(mask) for mask in masks]``. A generator keeps only one
    mask alive at a time: ``encode_batch(decode(text, shape) for text in rles)``.

    Args:
        masks: (N, H, W) array, or an iterable of (H_i, W_i) arrays, any integer or bool
            dtype; nonzero pixels are foreground.

    Returns:
        N RLE strings, ``""`` for empty masks.
    """
    buffers = _thread_buffers()
    return [_format_ints(_encode_runs(mask, buffers)) for mask in masks]


def decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle RLE string into a mask.

    Args:
        rle: the RLE string; ``""``, NaN or ``None`` mean an empty mask.
        shape: ``(H, W)`` of the mask, both positive.

    Returns:
        (H, W) uint8 mask with values in {0, 1}, C-contiguous.

    Raises:
        ValueError: malformed string (odd number of tokens, non-integer token, start or
            length below 1, a run past the end of the image, runs unsorted or
            overlapping) or a bad ``shape``.
    """
    height, width = _check_shape(shape)
    n_pixels = height * width
    if _is_empty(rle, "rle"):
        return np.zeros((height, width), dtype=np.uint8)
    starts, lengths = _parse_runs(rle, "rle")  # type: ignore[arg-type]
    # One cheap test of all conditions; sorted, non-overlapping positive runs end with
    # the last one, so only it needs the end-of-image test. Details only on failure.
    if not (
        starts.min() >= 1
        and lengths.min() >= 1
        and starts[-1] - 1 + lengths[-1] <= n_pixels
        and (starts[1:] >= starts[:-1] + lengths[:-1]).all()
    ):
        _check_positive(starts, lengths, "rle")
        _check_runs_fit(starts, lengths, n_pixels, shape)
        _check_sorted(starts, lengths, "rle")
        raise AssertionError(f"rle failed the quick check but passed the detailed ones: {rle!r}")

    starts0 = starts - 1
    ends0 = starts0 + lengths
    # Alternate background gaps and foreground runs, then let np.repeat write the
    # column-major pixels in one pass.
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0] = starts0[0]
    counts[2:-1:2] = starts0[1:] - ends0[:-1]
    counts[-1] = n_pixels - ends0[-1]
    counts[1::2] = lengths
    values = np.zeros(counts.size, dtype=np.uint8)
    values[1::2] = 1
    column_major = np.repeat(values, counts).reshape(width, height)
    # cv2.transpose is faster than numpy's strided copy for uint8.
    return cv2.transpose(column_major)


def check_rle(rle: str | float | None, where: str = "rle") -> None:
    """Check everything about an RLE string that does not need the image shape.

    Args:
        rle: the RLE string; ``""``, NaN and ``None`` (empty masks) pass.
        where: how error messages name the string, e.g. ``"train.csv row 7"``.

    Raises:
        ValueError: odd number of tokens, non-integer token, start or length below 1,
            runs unsorted or overlapping.
    """
    if _is_empty(rle, where):
        return
    starts, lengths = _parse_runs(rle, where)  # type: ignore[arg-type]
    _check_positive(starts, lengths, where)
    _check_sorted(starts, lengths, where)


def check_rles(rles: Sequence[str | float | None], names: Sequence[str] | None = None) -> None:
    """``check_rle`` for many strings at once, vectorised over all their runs.

    Args:
        rles: RLE strings; ``""``, NaN and ``None`` pass.
        names: how error messages name each string (default ``"rles[i]"``).

    Raises:
        ValueError: the first malformed string, with the same message as ``check_rle``.
    """
    _parse_many(rles, names, require_sorted=True)


def union_rles(rles: Sequence[str | float | None]) -> str:
    """Union several RLE strings of the same image without knowing its shape.

    Overlapping or touching runs merge into one. Used to turn one-row-per-object CSVs
    (DSB 2018, Airbus) into one mask per image.

    Args:
        rles: RLE strings, each in any run order; ``""``, NaN and ``None`` are ignored.

    Returns:
        The union as a canonical RLE string (sorted, non-touching runs), ``""`` if
        every input is empty.

    Raises:
        ValueError: an input has an odd number of tokens, a non-integer token or a
            start or length below 1; the message names its index in ``rles``.
    """
    return union_rles_grouped(rles, np.zeros(len(rles), dtype=np.int64), 1)[0]


def union_rles_grouped(
    rles: Sequence[str | float | None],
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Union RLE strings per group (e.g. per image), all groups in one vectorised pass.

    Args:
        rles: RLE strings, each in any run order; ``""``, NaN and ``None`` are ignored.
        groups: the group of each string, integers in ``[0, n_groups)``.
        n_groups: the number of groups.
        names: how error messages name each string (default ``"rles[i]"``).

    Returns:
        ``n_groups`` canonical RLE strings; ``""`` for a group with no runs.

    Raises:
        ValueError: ``groups`` does not match ``rles`` or lies outside
            ``[0, n_groups)``; or a string is malformed (as in ``union_rles``).
    """
    group_of = np.asarray(groups, dtype=np.int64).reshape(-1)
    if group_of.size != len(rles):
        raise ValueError(f"groups must have one entry per rle ({len(rles)}); got {group_of.size}")
    if group_of.size and (group_of.min() < 0 or group_of.max() >= n_groups):
        raise ValueError(
            f"groups must lie in [0, {n_groups}); got values from {group_of.min()} "
            f"to {group_of.max()}"
        )
    starts, lengths, owners = _parse_many(rles, names, require_sorted=False)
    run_group = group_of[owners]
    order = np.lexsort((starts, run_group))
    starts, run_group = starts[order], run_group[order]
    ends = starts + lengths[order]
    # Segmented running maximum of the exclusive ends: offsetting each group by more
    # than any rank in it stops a group's reach leaking into the next. Ranks, not the
    # raw values, keep the offsets far from int64 overflow.
    sorted_ends = np.sort(ends)
    span = sorted_ends.size + 1
    ranks = np.searchsorted(sorted_ends, ends)
    reach = sorted_ends[np.maximum.accumulate(run_group * span + ranks) - run_group * span]
    opens = np.ones(starts.size, dtype=bool)
    opens[1:] = (run_group[1:] != run_group[:-1]) | (starts[1:] > reach[:-1])
    closes = np.ones(starts.size, dtype=bool)
    closes[:-1] = opens[1:]
    merged = np.empty(2 * int(opens.sum()), dtype=np.int64)
    merged[0::2] = starts[opens]
    merged[1::2] = reach[closes] - starts[opens]
    counts = 2 * np.bincount(run_group[opens], minlength=n_groups)
    return _format_split(merged, counts)


class _Buffers:
    """Scratch arrays reused from mask to mask while the mask shape stays the same.

    Fresh 100 kB+ temporaries for every mask cost page faults (the allocator hands
    them back to the OS between masks), which measured 3x the arithmetic of encoding
    a 350x525 mask on a small VM. One set per thread, so threads never share them.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """An uninitialised array of this shape and dtype, reused while they match."""
        array = self._arrays.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = self._arrays[name] = np.empty(shape, dtype=dtype)
        return array


def _thread_buffers() -> _Buffers:
    """This thread's scratch arrays, created on first use."""
    buffers = getattr(_THREAD_STATE, "buffers", None)
    if buffers is None:
        buffers = _THREAD_STATE.buffers = _Buffers()
    return buffers


def _encode_runs(mask: np.ndarray, buffers: _Buffers) -> np.ndarray:
    """Interleaved 1-indexed (start, length) int64 array of a (H, W) mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) array; got shape {mask.shape}")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
        raise ValueError(f"mask must have an integer or bool dtype; got {mask.dtype}")
    if mask.size == 0:
        return np.empty(0, dtype=np.int64)
    height, width = mask.shape
    if mask.dtype == bool:
        foreground = np.ascontiguousarray(mask)
    else:
        foreground = np.not_equal(mask, 0, out=buffers.get("foreground", mask.shape, np.bool_))
    # About half the masks of a submission are empty; skip the transpose for them.
    if not foreground.any():
        return np.empty(0, dtype=np.int64)
    transposed = buffers.get("transposed", (width, height), np.uint8)
    flat = cv2.transpose(foreground.view(np.uint8), dst=transposed).ravel()
    changed = buffers.get("changed", (flat.size - 1,), np.bool_)
    # 0-based positions where the value changes, as the first pixel after the change.
    edges = np.flatnonzero(np.not_equal(flat[1:], flat[:-1], out=changed)) + 1
    if flat[0]:
        edges = np.concatenate(([0], edges))
    if flat[-1]:
        edges = np.concatenate((edges, [flat.size]))
    runs = edges.astype(np.int64)
    runs[1::2] -= runs[0::2]
    runs[0::2] += 1
    return runs


def _format_ints(values: np.ndarray) -> str:
    """Space-joined decimal text of integer values."""
    # One printf-style format of a tuple measured as fast as vectorised digit
    # arithmetic in numpy and 1.5x faster than " ".join(map(str, ...)).
    return ("%d " * values.size % tuple(values.tolist()))[:-1]


def _format_split(values: np.ndarray, counts: np.ndarray) -> list[str]:
    """Format consecutive chunks of ``counts[i]`` values each as separate strings."""
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    return [_format_ints(values[start:stop]) for start, stop in itertools.pairwise(bounds)]


def _parse_many(
    rles: Sequence[str | float | None], names: Sequence[str] | None, require_sorted: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, lengths and owning string index of the runs of many RLE strings.

    One ``np.fromstring`` over the joined strings replaces per-string parsing. When a
    check fails, the culprit is checked again alone so the message is ``check_rle``'s.
    """
    if names is not None and len(names) != len(rles):
        raise ValueError(f"names must have one entry per rle ({len(rles)}); got {len(names)}")

    def where(index: int) -> str:
        return names[index] if names is not None else f"rles[{index}]"

    owners = [index for index, text in enumerate(rles) if not _is_empty(text, where(index))]
    if not owners:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    texts = [str(rles[index]) for index in owners]
    joined = " ".join(texts)
    if joined.isascii() and not joined.encode("ascii").translate(None, _RLE_CHARS):
        # Digits and whitespace only: one fromstring per string gives its values and
        # token count at once (twice as fast as one over the joined text plus splits).
        arrays = [np.fromstring(text, dtype=np.int64, sep=" ") for text in texts]
        token_counts = np.array([array.size for array in arrays], dtype=np.int64)
        values = np.concatenate(arrays)
        if (token_counts % 2).any() or (values >= _MAX_TOKEN).any():
            for index, text in zip(owners, texts, strict=True):
                _parse_runs(text, where(index))
        starts, lengths = values[0::2], values[1::2]
        run_counts = token_counts // 2
    else:
        # Signs or stray characters: parse one by one, raising at the first bad token.
        pairs = [_parse_runs(text, where(index)) for index, text in zip(owners, texts, strict=True)]
        starts = np.concatenate([pair[0] for pair in pairs])
        lengths = np.concatenate([pair[1] for pair in pairs])
        run_counts = np.array([pair[0].size for pair in pairs], dtype=np.int64)
    run_owner = np.repeat(np.array(owners, dtype=np.int64), run_counts)
    bad = (starts < 1) | (lengths < 1)
    if require_sorted:
        same_string = run_owner[1:] == run_owner[:-1]
        bad[1:] |= same_string & (starts[1:] < starts[:-1] + lengths[:-1])
    if bad.any():
        index = int(run_owner[int(np.argmax(bad))])
        culprit_starts, culprit_lengths = _parse_runs(str(rles[index]), where(index))
        _check_positive(culprit_starts, culprit_lengths, where(index))
        _check_sorted(culprit_starts, culprit_lengths, where(index))
        raise AssertionError(f"{where(index)} failed the batch check but passed alone")
    return starts, lengths, run_owner


def _is_empty(rle: object, where: str) -> bool:
    """True for the empty-mask spellings; rejects types that are not RLE at all."""
    if rle is None:
        return True
    if isinstance(rle, float):
        if math.isnan(rle):
            return True
        raise ValueError(f"{where} must be a string, NaN or None; got float {rle!r}")
    if not isinstance(rle, str):
        raise ValueError(f"{where} must be a string, NaN or None; got {type(rle).__name__} {rle!r}")
    return rle.strip() == ""


def _parse_runs(rle: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Split an RLE string into int64 starts and lengths, checking only the syntax."""
    if rle.isascii() and not rle.encode("ascii").translate(None, _RLE_CHARS):
        values = np.fromstring(rle, dtype=np.int64, sep=" ")
    else:
        values = _parse_tokens_slowly(rle, where)
    too_large = np.flatnonzero(values >= _MAX_TOKEN)
    if too_large.size:
        index = int(too_large[0])
        raise ValueError(
            f"{where} token {index} is too large: expected < {_MAX_TOKEN}; got "
            f"{rle.split()[index]!r}"
        )
    if values.size % 2:
        raise ValueError(
            f"{where} must hold 'start length' pairs; got an odd number of tokens "
            f"({values.size}): {_preview(rle)}"
        )
    return values[0::2], values[1::2]


def _parse_tokens_slowly(rle: str, where: str) -> np.ndarray:
    """Token-by-token parse that names the first token that is not an integer."""
    tokens = rle.split()
    for index, token in enumerate(tokens):
        body = token[1:] if token[:1] in "+-" else token
        if not (body.isascii() and body.isdigit()):
            raise ValueError(f"{where} must contain only integers; token {index} is {token!r}")
    # Clipped so that np.array cannot overflow; the caller reports oversized tokens.
    return np.array([min(int(token), _MAX_TOKEN) for token in tokens], dtype=np.int64)


def _check_positive(starts: np.ndarray, lengths: np.ndarray, where: str) -> None:
    """Starts and lengths must be at least 1."""
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        run = int(bad[0])
        raise ValueError(f"{where} run {run}: start must be >= 1; got {starts[run]}")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        run = int(bad[0])
        raise ValueError(
            f"{where} run {run} (start {starts[run]}): length must be >= 1; got {lengths[run]}"
        )


def _check_runs_fit(
    starts: np.ndarray, lengths: np.ndarray, n_pixels: int, shape: tuple[int, int]
) -> None:
    """Runs must end inside the H*W pixels of the image."""
    # Checked apart from start + length so huge tokens cannot overflow int64.
    past_end = np.flatnonzero(
        (starts > n_pixels) | (lengths > n_pixels) | (starts - 1 + lengths > n_pixels)
    )
    if past_end.size:
        run = int(past_end[0])
        raise ValueError(
            f"rle run {run} (start {starts[run]}, length {lengths[run]}) runs past the "
            f"end of the image: shape {tuple(shape)} has H*W = {n_pixels} pixels"
        )


def _check_sorted(starts: np.ndarray, lengths: np.ndarray, where: str) -> None:
    """Runs must be in increasing order and must not overlap (touching is allowed)."""
    overlap = np.flatnonzero(starts[1:] < starts[:-1] + lengths[:-1])
    if overlap.size:
        run = int(overlap[0]) + 1
        raise ValueError(
            f"{where} runs must be sorted and non-overlapping; run {run} (start "
            f"{starts[run]}) begins before run {run - 1} (start {starts[run - 1]}, "
            f"length {lengths[run - 1]}) ends"
        )


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Validate ``(H, W)`` and return it as two Python ints."""
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape must be a (H, W) tuple; got {shape!r}")
    if not all(
        isinstance(side, (int, np.integer)) and not isinstance(side, bool) for side in shape
    ):
        raise ValueError(f"shape must hold two integers; got {shape!r}")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"shape must be positive; got {shape!r}")
    return height, width


def _preview(rle: str, limit: int = 60) -> str:
    """The start of a long RLE string, for error messages."""
    return repr(rle) if len(rle) <= limit else repr(rle[:limit]) + "..."

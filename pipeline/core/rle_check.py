"""Parsing and checking Kaggle RLE strings without their image's shape.

Splits strings into int64 starts and lengths (one string, or many at once vectorised
over all their runs) and checks what needs no shape: integer tokens in pairs, starts and
lengths of at least 1, runs sorted and non-overlapping. Errors name the string (e.g.
``"train.csv row 7"``) and the offending token or run. Decoding, encoding and unions
are ``rle``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Characters that make up a well-formed RLE string; anything else sends the string to
# the slow path that finds and names the offending token.
_RLE_CHARS = b"0123456789 \t\n\r"
# No image has this many pixels; below it, sums of tokens stay far inside int64.
_MAX_TOKEN = 10**15


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


def _preview(rle: str, limit: int = 60) -> str:
    """The start of a long RLE string, for error messages."""
    return repr(rle) if len(rle) <= limit else repr(rle[:limit]) + "..."

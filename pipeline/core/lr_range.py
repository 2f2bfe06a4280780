"""Pure maths of the learning-rate range test, and reading its suggestion back.

Range test (Smith 2015, fastai): the learning rate grows exponentially, one value per
batch; the batch losses are smoothed with a bias-corrected exponential moving average;
the test stops once the smoothed loss exceeds ``diverge_factor`` x its running minimum
or a loss is not finite. Two suggestions are read off the smoothed curve: the steepest
descent in log-lr before the minimum, and the minimum's lr / 10. ``resolve_lr`` turns
``train.lr: auto`` into the suggestion saved in ``lr_find.json``.

numpy/pandas only (plus the pure config module): nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.layout import LR_FIND_DIR, LR_FIND_JSON


def exponential_lrs(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """float64 (steps,): ``start_lr`` to ``end_lr`` inclusive, evenly spaced in log-lr."""
    if not 0 < start_lr < end_lr:
        raise ValueError(
            f"lr_find.start_lr and lr_find.end_lr must satisfy 0 < start_lr < end_lr; "
            f"got {start_lr} and {end_lr}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"lr_find.steps must be an integer >= 2; got {steps!r}")
    return np.geomspace(start_lr, end_lr, steps)


def _check_smoothing(smoothing: float) -> None:
    if not 0 <= smoothing < 1:
        raise ValueError(f"lr_find.smoothing must be in [0, 1); got {smoothing}")


def smooth_losses(losses: ArrayLike, smoothing: float) -> np.ndarray:
    """Bias-corrected exponential moving average of ``losses``: float64 (N,).

    ``smoothed[t] = sum_k smoothing**k * loss[t-k] / sum_k smoothing**k`` (k = 0..t),
    i.e. the fastai EMA divided by ``1 - smoothing**(t+1)``, so a constant series stays
    constant from the first value on. ``smoothing = 0`` returns the losses unchanged.
    """
    _check_smoothing(smoothing)
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        return values
    # pandas' adjusted EWM is exactly the bias-corrected EMA, without a Python loop.
    return pd.Series(values).ewm(alpha=1.0 - smoothing, adjust=True).mean().to_numpy()


def find_divergence(losses: ArrayLike, smoothing: float, diverge_factor: float) -> int | None:
    """Index of the first batch where the range test must stop, or None.

    Stops at the first non-finite loss, or where the smoothed loss exceeds
    ``diverge_factor`` x its minimum so far (losses are assumed positive).
    """
    if diverge_factor <= 1:
        raise ValueError(f"lr_find.diverge_factor must be > 1; got {diverge_factor}")
    raw = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(raw)
    n_finite = int(np.argmax(bad)) if bad.any() else raw.size
    smoothed = smooth_losses(raw[:n_finite], smoothing)
    over = smoothed > diverge_factor * np.minimum.accumulate(smoothed)
    if over.any():
        return int(np.argmax(over))
    return n_finite if n_finite < raw.size else None


@dataclass(frozen=True)
class LrSuggestion:
    """What a range test suggests; indices refer to the recorded (lr, loss) rows."""

    suggested_lr: float
    rule: str
    min_over_10_lr: float
    min_loss_lr: float
    min_index: int
    steep_lr: float | None
    steep_index: int | None
    minimum_inside_range: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``lr_find.json``)."""
        return {
            "suggested_lr": self.suggested_lr,
            "rule": self.rule,
            "min_over_10_lr": self.min_over_10_lr,
            "min_loss_lr": self.min_loss_lr,
            "min_index": self.min_index,
            "steep_lr": self.steep_lr,
            "steep_index": self.steep_index,
            "minimum_inside_range": self.minimum_inside_range,
        }


RULE_MIN_OVER_10 = "minimum/10"
RULE_STEEPEST = "steepest"


def suggest_lr(
    lrs: ArrayLike,
    losses: ArrayLike,
    smoothing: float,
    stopped_early: bool,
    skip_start: int | None = None,
) -> LrSuggestion:
    """Read the suggestions off a recorded range test.

    Args:
        lrs: float (N,) increasing learning rates, one per recorded batch.
        losses: float (N,) batch losses; rows from the first non-finite one are ignored.
        smoothing: the EMA factor of ``smooth_losses``.
        stopped_early: whether the test stopped on divergence (then the minimum of the
            smoothed loss is inside the range even when it is the last finite row).
            Otherwise the minimum counts as inside only when at least ``max(1, N // 20)``
            rows follow it: a moving average that lags a flat end of the curve keeps
            creeping down and puts its minimum on the last rows.
        skip_start: rows ignored by the steepest-slope search, whose first smoothed
            values rest on few batches and whose slopes are mostly noise; default
            ``max(1, N // 10)`` (fastai skips 10 of 100).

    Returns:
        ``steep_lr``: lr of the most negative slope d(smoothed)/d(log lr), searched from
        ``skip_start`` up to the smoothed minimum (None when it never descends there).
        ``min_over_10_lr``: lr of the smoothed minimum / 10. ``suggested_lr`` is the
        smaller of the two; the steepest point alone when the loss was still falling at
        the end of the range (no minimum to divide), minimum/10 alone when the loss
        never descends before its minimum. Why the smaller: both estimate "a high lr at
        which the loss still falls fast", and each errs high in a known way. The
        moving average lags the raw losses by about ``smoothing / (1 - smoothing)``
        batches, which moves its steepest point to higher lrs (about half a decade at
        smoothing 0.98, 200 steps over 7 decades, on a synthetic curve); minimum/10
        errs high when the valley is wide and flat (the demo: a valley from 1e-2 to
        1e-1, minimum/10 = 1e-2 trained worse than 2e-3). Erring low is guarded by
        ``skip_start``.
    """
    lr = np.asarray(lrs, dtype=np.float64)
    raw = np.asarray(losses, dtype=np.float64)
    if lr.shape != raw.shape or lr.ndim != 1:
        raise ValueError(
            f"lrs and losses must be 1-D of one length; got {lr.shape} and {raw.shape}"
        )
    bad = ~np.isfinite(raw)
    n = int(np.argmax(bad)) if bad.any() else raw.size
    if n < 2:
        raise ValueError(
            f"the range test recorded {n} finite loss(es) before diverging; need at least 2 "
            f"(lower lr_find.start_lr or check the data)"
        )
    lr, smoothed = lr[:n], smooth_losses(raw[:n], smoothing)
    if np.any(lr <= 0) or np.any(np.diff(lr) <= 0):
        raise ValueError("lrs must be positive and strictly increasing")
    min_index = int(np.argmin(smoothed))
    skip = max(1, n // 10) if skip_start is None else int(skip_start)
    slope = np.gradient(smoothed, np.log(lr))
    steep_index: int | None = None
    if min_index > skip:
        candidate = skip + int(np.argmin(slope[skip : min_index + 1]))
        if slope[candidate] < 0:
            steep_index = candidate
    inside = stopped_early or min_index < n - 1 - max(1, n // 20)
    min_over_10 = float(lr[min_index] / 10)
    steep_lr = float(lr[steep_index]) if steep_index is not None else None
    if steep_lr is not None and not inside:
        suggested, rule = steep_lr, f"{RULE_STEEPEST} (no minimum inside the range)"
    elif steep_lr is not None and steep_lr < min_over_10:
        suggested, rule = steep_lr, f"{RULE_STEEPEST} (below minimum/10)"
    elif steep_lr is not None:
        suggested, rule = min_over_10, f"{RULE_MIN_OVER_10} (below the steepest point)"
    else:
        suggested, rule = min_over_10, f"{RULE_MIN_OVER_10} (no descent before the minimum)"
    return LrSuggestion(
        suggested_lr=suggested,
        rule=rule,
        min_over_10_lr=min_over_10,
        min_loss_lr=float(lr[min_index]),
        min_index=min_index,
        steep_lr=steep_lr,
        steep_index=steep_index,
        minimum_inside_range=inside,
    )


def ema_lag_decades(smoothing: float, start_lr: float, end_lr: float, steps: int) -> float:
    """How far (in decades of lr) the smoothed loss trails the raw losses.

    The EMA's mean lag is ``smoothing / (1 - smoothing)`` batches; each batch moves the
    lr by ``log10(end_lr / start_lr) / (steps - 1)`` decades.
    """
    _check_smoothing(smoothing)
    lag_steps = smoothing / (1 - smoothing)
    return lag_steps * math.log10(end_lr / start_lr) / (steps - 1)


def range_test_frame(lrs: ArrayLike, losses: ArrayLike, smoothing: float) -> pd.DataFrame:
    """The recorded test as a table: ``lr``, ``loss``, ``smoothed`` (float64, N rows).

    ``smoothed`` is NaN from the first non-finite loss on.
    """
    raw = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(raw)
    n = int(np.argmax(bad)) if bad.any() else raw.size
    smoothed = np.full(raw.size, np.nan)
    smoothed[:n] = smooth_losses(raw[:n], smoothing)
    return pd.DataFrame(
        {"lr": np.asarray(lrs, dtype=np.float64), "loss": raw, "smoothed": smoothed}
    )


def lr_find_path(config: Config) -> Path:
    """``runs/<experiment>/lr_find/lr_find.json``."""
    return config.run_dir / LR_FIND_DIR / LR_FIND_JSON


def resolve_lr(config: Config) -> float:
    """``train.lr`` as a float; for ``auto``, the LR finder's ``suggested_lr``.

    FileNotFoundError when ``auto`` is asked for before the LR finder ran.
    """
    lr = config.train.lr
    if lr != "auto":
        return float(lr)
    path = lr_find_path(config)
    if not path.is_file():
        source = config.source or "<config>"
        raise FileNotFoundError(
            f"train.lr is auto but {path} does not exist; run "
            f"`{command_line('lr-find', config=source)}` first (with the same --set "
            f"overrides)"
        )
    try:
        value = json.loads(path.read_text()).get("suggested_lr")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); run lr_find again") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{path}: suggested_lr must be a positive number; got {value!r}")
    return float(value)

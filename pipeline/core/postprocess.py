"""Post-processing of one class of one image: prob (H, W) -> mask (H, W) uint8 {0, 1}.

The rules, applied in this fixed order by ``postprocess_mask``:

1. ``binarize``: a pixel is on iff ``prob >= threshold``. For uint8-quantised probs
   ``q = round(p * 255)`` the threshold is moved onto the 256-level grid first:
   ``level = ceil(threshold * 255 - 1e-9)`` (``quantise_threshold``; the 1e-9 absorbs
   float error in thresholds such as 0.4 * 255) and a pixel is on iff ``q >= level``.
   ``threshold_search`` scores exactly this rule, so tuned scores are reproduced exactly
   on uint8 probs. For a float prob ``q / 255`` and a threshold that is a short decimal
   (0.35, 0.4), the two rules agree.
2. ``remove_small_components``: 8-connected components under ``min_component`` pixels
   are removed.
3. ``remove_small_mask``: the whole mask is blanked if its area is under ``min_area``.
4. ``apply_gate``: the whole mask is blanked if the image's gate score is under
   ``gate_threshold``. The score is the classifier's presence probability
   (``gate="classifier"``), ``segmentation_score``: the mean of the top-k quantised
   pixel probs (``gate="segmentation"``), or the mean of the two (``gate="fused"``,
   ``fused_score``; Clouds 1st place fused the classifier with the top-k mean).

Across the classes of one image, ``postprocess_image`` may then apply the "at least one
class per image" rule (Clouds 1st place; ``postprocess.at_least_one``): an image left
with no mask at all keeps the class whose top-k mean (``AT_LEAST_ONE_TOPK``) is
highest, masked by its threshold and component rule only (its minimum area and gate are
waived). ``auto`` turns it on iff every training image has at least one class;
``search`` iff it raises the tuned OOF score (``pipeline.tune`` decides).

Then ``PostprocessParams`` (one class's settings) and ``postprocess.json`` I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np

from pipeline.core.atomic import write_json
from pipeline.core.metrics import above_threshold
from pipeline.core.probstore import QUANTISATION, quantise_prob

Gate = Literal["none", "classifier", "segmentation", "fused"]
GATES: tuple[str, ...] = get_args(Gate)
# The gates that read the classifier's probability, and those that read the top-k mean.
CLASSIFIER_GATES: frozenset[str] = frozenset({"classifier", "fused"})
TOPK_GATES: frozenset[str] = frozenset({"segmentation", "fused"})
# postprocess.at_least_one: never, always, where every training image has a class, or
# where it raises the tuned OOF score (tune decides, nested-honestly).
AtLeastOne = Literal["never", "always", "auto", "search"]
AT_LEAST_ONE_CHOICES: tuple[str, ...] = get_args(AtLeastOne)
# The top-k fraction of the score that picks the class the rule keeps.
AT_LEAST_ONE_TOPK = 0.01
# Slack (in quantisation levels) for float error when a threshold lands on a level.
LEVEL_EPS = 1e-9


def quantise_threshold(threshold: float) -> int:
    """The uint8 level in [0, 256] a threshold in [0, 1] becomes: on iff ``q >= level``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    return math.ceil(threshold * QUANTISATION - LEVEL_EPS)


def binarize(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Mask (H, W) uint8 {0, 1} of pixels at or above ``threshold``.

    ``prob`` is (H, W) float in [0, 1] (on iff ``prob >= threshold``) or uint8
    quantised (on iff ``q >= quantise_threshold(threshold)``).
    """
    if prob.dtype == np.uint8:
        return (prob >= quantise_threshold(threshold)).view(np.uint8)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    return above_threshold(prob, threshold).view(np.uint8)


def remove_small_mask(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Blank the whole mask (H, W) uint8 if it has fewer than ``min_area`` pixels on."""
    if min_area > 0 and np.count_nonzero(mask) < min_area:
        return np.zeros_like(mask)
    return mask


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove 8-connected components under ``min_size`` pixels from a mask (H, W) uint8."""
    if min_size <= 1:
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        (mask > 0).view(np.uint8), connectivity=8
    )
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False
    return keep[labels].view(np.uint8)


def apply_gate(mask: np.ndarray, score: float, gate_threshold: float | None) -> np.ndarray:
    """Blank the mask (H, W) uint8 if ``score < gate_threshold``; None means no gate."""
    if gate_threshold is not None and score < gate_threshold:
        return np.zeros_like(mask)
    return mask


def topk_count(n_pixels: int, topk_fraction: float) -> int:
    """How many pixels the segmentation gate averages: ``max(1, round(f * n_pixels))``."""
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1]; got {topk_fraction}")
    return max(1, round(topk_fraction * n_pixels))


def segmentation_score(prob: np.ndarray, topk_fraction: float) -> float:
    """Mean of the top-k quantised probs of one class map, as a prob in [0, 1].

    ``prob`` is (H, W) uint8 quantised or float in [0, 1] (quantised first, so both give
    the same score); k = ``topk_count(H * W, topk_fraction)``. Computed as the exact
    integer sum of the k largest levels divided by ``k * 255``.
    """
    q = prob if prob.dtype == np.uint8 else quantise_prob(prob)
    flat = q.reshape(-1)
    k = topk_count(flat.size, topk_fraction)
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    return int(top.sum(dtype=np.int64)) / (k * float(QUANTISATION))


def fused_score(classifier_prob: Any, topk_mean: Any) -> Any:
    """The fused gate's score: the mean of the classifier's probability and the top-k mean.

    Floats or broadcasting arrays of each.
    """
    return (classifier_prob + topk_mean) / 2.0


def postprocess_mask(
    prob: np.ndarray,
    threshold: float,
    min_area: int,
    min_component: int = 0,
    gate_score: float | None = None,
    gate_threshold: float | None = None,
) -> np.ndarray:
    """prob (H, W) float or uint8-quantised -> mask (H, W) uint8 {0, 1}.

    threshold -> small components -> small mask -> gate, as in the module docstring.
    """
    if gate_threshold is not None and gate_score is None:
        raise ValueError(f"gate_score is needed with gate_threshold {gate_threshold}; got None")
    mask = binarize(prob, threshold)
    mask = remove_small_components(mask, min_component)
    mask = remove_small_mask(mask, min_area)
    return apply_gate(mask, 0.0 if gate_score is None else gate_score, gate_threshold)


def searchable_gates(
    gates: Sequence[str], with_presence: bool, missing: str, hint: str
) -> list[str]:
    """``postprocess.gates`` as searched: the classifier gates only ``with_presence``
    probabilities; ValueError when nothing is left (``missing`` names the absent
    presence, ``hint`` how to get it)."""
    searched = [g for g in gates if with_presence or g not in CLASSIFIER_GATES]
    if not searched:
        raise ValueError(
            f"postprocess.gates {list(gates)} leaves nothing to search without {missing}; "
            f"add 'none' or 'segmentation', or {hint}"
        )
    return searched


def resolve_at_least_one(choice: str, every_image_has_a_class: bool) -> bool:
    """Whether the at-least-one rule applies: ``choice`` is one of ``AT_LEAST_ONE_CHOICES``
    (``search``: not before tune has scored it, so False here)."""
    if choice not in AT_LEAST_ONE_CHOICES:
        raise ValueError(
            f"at_least_one must be one of {list(AT_LEAST_ONE_CHOICES)}; got {choice!r}"
        )
    return choice == "always" or (choice == "auto" and every_image_has_a_class)


def at_least_one_applied(extra: Mapping[str, Any]) -> bool:
    """Whether ``postprocess.json``'s ``extra`` turns the at-least-one rule on (tune's
    resolved choice; files from before the rule existed: off)."""
    rule = extra.get("at_least_one")
    return isinstance(rule, Mapping) and rule.get("applied") is True


def postprocess_image(
    probs: Sequence[np.ndarray] | np.ndarray,
    params: Sequence[PostprocessParams],
    classifier_prob: Sequence[float] | np.ndarray | None = None,
    at_least_one: bool = False,
) -> np.ndarray:
    """Every class of one image: ``probs`` (C, H, W) float or uint8-quantised -> uint8
    (C, H, W) {0, 1}, one setting per class, then the at-least-one rule if asked.

    ``classifier_prob`` (C,) is needed iff some setting ``uses_classifier``.
    """
    if len(probs) != len(params):
        raise ValueError(f"probs must hold {len(params)} class maps; got {len(probs)}")
    masks = np.stack(
        [
            p.apply(probs[c], None if classifier_prob is None else float(classifier_prob[c]))
            for c, p in enumerate(params)
        ]
    )
    return keep_at_least_one(masks, probs, params) if at_least_one else masks


def keep_at_least_one(
    masks: np.ndarray, probs: Sequence[np.ndarray] | np.ndarray, params: Sequence[PostprocessParams]
) -> np.ndarray:
    """The at-least-one rule on one image's post-processed (C, H, W) ``masks``: if all
    are empty, the class with the highest top-k mean gets its threshold-and-component
    mask (a new array); otherwise ``masks`` unchanged."""
    if masks.any():
        return masks
    scores = [segmentation_score(probs[c], AT_LEAST_ONE_TOPK) for c in range(len(params))]
    keep = int(np.argmax(scores))
    out = masks.copy()
    out[keep] = params[keep].masked(probs[keep])
    return out


@dataclass(frozen=True)
class PostprocessParams:
    """One class's post-processing settings.

    ``gate`` is one of ``GATES``; ``gate_threshold`` is set iff the gate is not
    ``none``; ``topk_fraction`` (the top-k mean's k) iff the gate reads the top-k mean
    (``TOPK_GATES``).
    """

    threshold: float
    min_area: int
    min_component: int = 0
    gate: str = "none"
    gate_threshold: float | None = None
    topk_fraction: float | None = None

    def __post_init__(self) -> None:
        quantise_threshold(self.threshold)
        for name in ("min_area", "min_component"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}; got {self.gate!r}")
        if (self.gate == "none") != (self.gate_threshold is None):
            raise ValueError(
                f"gate_threshold must be set iff gate is not 'none'; got gate {self.gate!r}, "
                f"gate_threshold {self.gate_threshold!r}"
            )
        if self.gate_threshold is not None and not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must be in [0, 1]; got {self.gate_threshold}")
        if (self.gate in TOPK_GATES) != (self.topk_fraction is not None):
            raise ValueError(
                f"topk_fraction must be set iff gate is one of {sorted(TOPK_GATES)}; got gate "
                f"{self.gate!r}, topk_fraction {self.topk_fraction!r}"
            )
        if self.topk_fraction is not None:
            topk_count(1, self.topk_fraction)

    @property
    def uses_classifier(self) -> bool:
        """True where the gate reads the classifier's presence probability."""
        return self.gate in CLASSIFIER_GATES

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "params") -> PostprocessParams:
        """Build from ``to_dict`` output; unknown or missing keys raise, naming ``where``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {sorted(known)}")
        missing = [key for key in ("threshold", "min_area") if key not in data]
        if missing:
            raise ValueError(f"{where}: missing key {missing[0]!r}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def masked(self, prob: np.ndarray) -> np.ndarray:
        """The threshold and component rules only (no minimum area, no gate)."""
        return remove_small_components(binarize(prob, self.threshold), self.min_component)

    def apply(self, prob: np.ndarray, classifier_prob: float | None = None) -> np.ndarray:
        """prob (H, W) float or uint8-quantised -> mask (H, W) uint8, gate score included.

        ``classifier_prob`` (this image and class) is needed iff ``uses_classifier``.
        """
        score: float | None = None
        if self.uses_classifier and classifier_prob is None:
            raise ValueError(f"classifier_prob is needed for gate {self.gate!r}; got None")
        if self.gate == "classifier":
            score = classifier_prob
        elif self.gate in TOPK_GATES:
            assert self.topk_fraction is not None
            score = segmentation_score(prob, self.topk_fraction)
            if self.gate == "fused":
                assert classifier_prob is not None
                score = float(fused_score(classifier_prob, score))
        return postprocess_mask(
            prob, self.threshold, self.min_area, self.min_component, score, self.gate_threshold
        )


def save_postprocess(
    path: str | Path,
    params_by_class: Mapping[str, PostprocessParams],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``postprocess.json``: ``{"classes": {name: params}, "extra": {...}}``, atomically.

    ``extra`` holds JSON-ready context (scores, grids, the OOF it was tuned on).
    """
    path = Path(path)
    payload = {
        "classes": {name: params.to_dict() for name, params in params_by_class.items()},
        "extra": dict(extra or {}),
    }
    write_json(path, payload, indent=2)


def load_postprocess(
    path: str | Path, classes: Sequence[str] | None = None
) -> tuple[dict[str, PostprocessParams], dict[str, Any]]:
    """Read ``postprocess.json`` -> (params by class name, extra).

    With ``classes`` given, the file must hold exactly those classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"postprocess file {path} does not exist (run tune first)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict) or set(payload) != {"classes", "extra"}:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} must have keys ['classes', 'extra']; got {keys}")
    if not isinstance(payload["classes"], dict) or not isinstance(payload["extra"], dict):
        raise ValueError(f"{path}: classes and extra must be mappings")
    params: dict[str, PostprocessParams] = {}
    for name, value in payload["classes"].items():
        if not isinstance(value, dict):
            raise ValueError(f"{path} class {name!r}: must be a mapping of settings; got {value!r}")
        params[name] = PostprocessParams.from_dict(value, where=f"{path} class {name!r}")
    if classes is not None:
        missing = [name for name in classes if name not in params]
        if missing:
            raise ValueError(f"{path}: missing class {missing[0]!r}; expected {list(classes)}")
        unknown = [name for name in params if name not in classes]
        if unknown:
            raise ValueError(f"{path}: unknown class {unknown[0]!r}; expected {list(classes)}")
        params = {name: params[name] for name in classes}
    return params, payload["extra"]

"""What a prediction does around its networks, as plain data (pure layer).

A ``PredictionPlan`` holds everything between the images and the submission that is not
a network: the classes, the model's input size, the TTA views and their merge (over
views and folds), the tuned post-processing with the at-least-one rule and where the
classifier gates read their presence, and the submission's CSV format and mask size.
``pipeline.predict`` makes one from a trained run; an exported bundle stores it in its
manifest (``to_dict``/``from_dict``), so both predict the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core.postprocess import PostprocessParams
from pipeline.core.tta import MERGES, parse_view

# Where the classifier gates read their presence: the separate classifier's folds or the
# segmentation model's presence head (``model.classification_head``).
PRESENCE_SOURCES: tuple[str, ...] = ("classifier", "head")


@dataclass(frozen=True)
class PredictionPlan:
    """Everything but the networks that turns images into a submission.

    ``input_size``: (H, W) every image is resized to for the segmentation network;
    ``presence_size``: the separate classifier's, when a gate reads it. ``postprocess``:
    per class, in ``classes`` order. ``gate_source``: None when no class is gated by a
    presence probability. ``submission_size``: None for each image's own size.
    """

    classes: tuple[str, ...]
    input_size: tuple[int, int]
    views: tuple[str, ...]
    merge: str
    batch_size: int
    postprocess: Mapping[str, PostprocessParams]
    at_least_one: bool
    gate_source: str | None
    csv_format: str
    submission_size: tuple[int, int] | None
    presence_size: tuple[int, int] | None = None
    exclusive: bool = False  # model.activation softmax: argmax masks before post-processing

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("a prediction plan needs at least one class")
        if list(self.postprocess) != list(self.classes):
            raise ValueError(
                f"post-processing classes {list(self.postprocess)} must be the plan's "
                f"classes {list(self.classes)}, in order"
            )
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}; got {self.merge!r}")
        for view in self.views:
            parse_view(view)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.gate_source is not None and self.gate_source not in PRESENCE_SOURCES:
            raise ValueError(
                f"gate_source must be one of {list(PRESENCE_SOURCES)} or None; got "
                f"{self.gate_source!r}"
            )
        gated = self.gated_classes
        if gated and self.gate_source is None:
            raise ValueError(f"classes {gated} are gated by a presence, but gate_source is None")
        if self.gate_source == "classifier" and self.presence_size is None:
            raise ValueError("a plan gated by the separate classifier needs presence_size")

    @property
    def gated_classes(self) -> list[str]:
        """The classes whose gate reads a presence probability."""
        return [name for name, p in self.postprocess.items() if p.uses_classifier]

    @property
    def uses_classifier(self) -> bool:
        """True where the separate classifier's presence is needed."""
        return self.gate_source == "classifier"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``from_dict`` reads it back)."""
        return {
            "classes": list(self.classes),
            "input_size": list(self.input_size),
            "views": list(self.views),
            "merge": self.merge,
            "batch_size": self.batch_size,
            "postprocess": {name: p.to_dict() for name, p in self.postprocess.items()},
            "at_least_one": self.at_least_one,
            "gate_source": self.gate_source,
            "csv_format": self.csv_format,
            "submission_size": list(self.submission_size) if self.submission_size else None,
            "presence_size": list(self.presence_size) if self.presence_size else None,
            "exclusive": self.exclusive,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> PredictionPlan:
        """Read ``to_dict``'s output; a missing or malformed entry is a ValueError naming
        ``where`` and the key."""
        try:
            postprocess = {
                str(name): PostprocessParams.from_dict(params, f"{where}: postprocess.{name}")
                for name, params in dict(data["postprocess"]).items()
            }
            return cls(
                classes=tuple(str(name) for name in data["classes"]),
                input_size=_size(data["input_size"]),
                views=tuple(str(view) for view in data["views"]),
                merge=str(data["merge"]),
                batch_size=int(data["batch_size"]),
                postprocess=postprocess,
                at_least_one=bool(data["at_least_one"]),
                gate_source=None if data["gate_source"] is None else str(data["gate_source"]),
                csv_format=str(data["csv_format"]),
                submission_size=_optional_size(data["submission_size"]),
                presence_size=_optional_size(data.get("presence_size")),
                exclusive=bool(data.get("exclusive", False)),
            )
        except KeyError as missing:
            raise ValueError(f"{where}: missing key {missing}") from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None


def _size(value: Sequence[Any]) -> tuple[int, int]:
    height, width = (int(side) for side in value)
    if height < 1 or width < 1:
        raise ValueError(f"a size must be two positive integers; got {list(value)}")
    return height, width


def _optional_size(value: Sequence[Any] | None) -> tuple[int, int] | None:
    return None if value is None else _size(value)

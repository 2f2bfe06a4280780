"""Statistics of a training set's masks for the data notebook (pure layer).

Per class presence, empty-mask rate and mask areas, class co-occurrence, and images
with their truth overlaid (``truth_panels``, for ``report_figures.figure_overlays``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.folds import presence_matrix
from pipeline.core.images import read_image, resolve_image_path
from pipeline.core.masks import decode_masks, rles_by_image
from pipeline.core.report_figures import overlay


def mask_areas(table: pd.DataFrame) -> pd.DataFrame:
    """``image_id, class_name, area``: pixels of every non-empty mask (sum of RLE run lengths)."""
    rles = table["rle"].fillna("").astype(str)
    present = table[rles.str.len() > 0]
    areas = [
        int(np.array(rle.split(), dtype=np.int64)[1::2].sum()) for rle in present["rle"].astype(str)
    ]
    return pd.DataFrame(
        {
            "image_id": present["image_id"].to_numpy(),
            "class_name": present["class_name"].to_numpy(),
            "area": np.array(areas, dtype=np.int64),
        }
    )


def truth_panels(
    table: pd.DataFrame, classes: Sequence[str], image_folder: str | Path, image_ids: Sequence[str]
) -> list[list[tuple[str, np.ndarray]]]:
    """Per image: ``[(image_id, image), ("truth", overlay)]``, masks at the image's own size.

    For ``figure_overlays``; ``table`` is the canonical mask table.
    """
    rles = rles_by_image(table[table["image_id"].isin(set(image_ids))], classes)
    panels = []
    for image_id in image_ids:
        image = read_image(resolve_image_path(image_folder, image_id))
        truth = decode_masks(rles[image_id], (image.shape[0], image.shape[1]))
        panels.append([(image_id, image), ("truth", overlay(image, truth))])
    return panels


def class_statistics(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per class: ``images, present, frequency, empty_rate`` and mask area (pixels at the
    images' own size) ``area_mean, area_median, area_min, area_max`` over non-empty masks."""
    presence = presence_matrix(table, classes)
    areas = mask_areas(table).groupby("class_name")["area"]
    n = len(presence)
    stats = pd.DataFrame({"class": list(classes)})
    stats["images"] = n
    stats["present"] = [int(presence[c].sum()) for c in classes]
    stats["frequency"] = stats["present"] / max(n, 1)
    stats["empty_rate"] = 1.0 - stats["frequency"]
    for name, how in (("mean", "mean"), ("median", "median"), ("min", "min"), ("max", "max")):
        stats[f"area_{name}"] = stats["class"].map(areas.agg(how)).astype(float)
    return stats


def co_occurrence(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """(C, C) number of images in which both classes are present (diagonal: each alone counted)."""
    present = presence_matrix(table, classes)[list(classes)].to_numpy(dtype=np.int64)
    return pd.DataFrame(present.T @ present, index=list(classes), columns=list(classes))

"""A data set's fingerprint: what ``foldseg plan`` measures before it chooses (pure layer).

Image sizes and their spread, channels, per-class presence, object sizes (8-connected
components: 5th and 50th percentile area, components per image), the share of empty
image-class pairs and of images without any mask, and whether classes overlap. Presence
comes from every row of the table; shapes and objects from a seeded sample of images
(``max_images``), decoded at their own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.core import rle as rle_codec
from pipeline.core.exclusive import overlapping_pair
from pipeline.core.images import list_image_files, read_image_size, resolve_image_path

FINGERPRINT_VERSION = 1


def fingerprint_path(config_path: str | Path) -> Path:
    """``configs/NAME.fingerprint.json``, beside the planned ``configs/NAME.yaml``."""
    path = Path(config_path)
    return path.with_name(path.with_suffix("").name + ".fingerprint.json")


def fingerprint_tables(record: dict[str, Any]) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """A plan's record (``foldseg plan``'s JSON) as the report shows it: summary lines,
    the per-class fingerprint and the choices with their reasons."""
    fingerprint = record["fingerprint"]
    images = fingerprint["images"]
    machine = record.get("machine", {})
    lines = [
        f"{images['count']} training images, median {images['height_p50']:.0f}x"
        f"{images['width_p50']:.0f} (heights {images['height_range']}, widths "
        f"{images['width_range']}, {images['distinct_sizes']} distinct sizes), channels as "
        f"stored {images['channels']}; {fingerprint['empty_pair_share']:.0%} of image-class "
        f"pairs empty, {fingerprint['empty_image_share']:.0%} of images without any mask, "
        f"classes overlap in {fingerprint['overlap_share']:.0%} of the sampled images.",
        f"Planned on {machine.get('cores')} cores, {machine.get('memory_total_gb')} GB, GPU "
        f"{machine.get('gpu')}, native bfloat16 {machine.get('bf16')}, for "
        f"{record.get('hours')} h.",
    ]
    per_class = pd.DataFrame(
        [{"class": name, **values} for name, values in fingerprint["classes"].items()]
    )
    choices = pd.DataFrame(record.get("choices", []), columns=["key", "value", "reason"])
    choices["value"] = choices["value"].astype(str)
    return lines, per_class, choices


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _channels(path: Path) -> int:
    """Channels as stored (gray 1, RGB 3, RGBA 4), alpha counted; 0 when unreadable."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        return 0
    return 1 if image.ndim == 2 else int(image.shape[2])


def measure_fingerprint(
    table: pd.DataFrame,
    classes: Sequence[str],
    image_folder: str | Path,
    max_images: int = 400,
    seed: int = 0,
    test_folder: str | Path | None = None,
) -> dict[str, Any]:
    """Measure a training set.

    Args:
        table: the canonical mask table (``image_id``, ``class_name``, ``rle``).
        classes: the class names in order.
        image_folder: the training images.
        max_images: images whose masks are decoded for object sizes and overlap, drawn
            with ``seed`` (all when fewer).
        seed: the draw's seed.
        test_folder: the test images, whose sizes are measured too when given.

    Returns:
        A JSON-ready dict: ``images`` (count, sizes, channels), ``classes`` (per class:
        presence, areas, components), ``empty_pair_share``, ``empty_image_share``,
        ``overlap_share`` (share of sampled images where two classes share a pixel),
        ``overlapping_images`` (images, of all, where they do: from the RLE runs).
    """
    folder = Path(image_folder)
    ids = sorted(table["image_id"].unique())
    rles = table.pivot(index="image_id", columns="class_name", values="rle").loc[ids, list(classes)]
    present = rles.apply(lambda column: column.str.len() > 0)
    sizes = {i: read_image_size(resolve_image_path(folder, i)) for i in ids}
    heights = np.array([s[0] for s in sizes.values()])
    widths = np.array([s[1] for s in sizes.values()])
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(ids, size=min(max_images, len(ids)), replace=False).tolist())
    channel_counts: dict[str, int] = {}
    for image_id in sample[:20]:
        n = _channels(resolve_image_path(folder, image_id))
        channel_counts[str(n)] = channel_counts.get(str(n), 0) + 1
    areas: dict[str, list[int]] = {name: [] for name in classes}
    area_fractions: dict[str, list[float]] = {name: [] for name in classes}
    components: dict[str, list[int]] = {name: [] for name in classes}
    overlapping = 0
    for image_id in sample:
        shape = sizes[image_id]
        union = None
        overlap = False
        for name in classes:
            text = str(rles.at[image_id, name])
            if not text:
                continue
            mask = rle_codec.decode(text, shape)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            object_areas = stats[1:, cv2.CC_STAT_AREA].tolist()
            areas[name] += object_areas
            area_fractions[name] += [a / (shape[0] * shape[1]) for a in object_areas]
            components[name].append(int(n - 1))
            if union is None:
                union = mask.astype(bool)
            else:
                overlap = overlap or bool((union & (mask > 0)).any())
                union |= mask > 0
        overlapping += int(overlap)
    per_class = {}
    for name in classes:
        per_class[name] = {
            "presence": round(float(present[name].mean()), 4),
            "area_p5": _percentile(areas[name], 5),
            "area_p50": _percentile(areas[name], 50),
            "area_fraction_p5": _percentile(area_fractions[name], 5),
            "area_fraction_p50": _percentile(area_fractions[name], 50),
            "components_p50": _percentile(components[name], 50),
            "components_p95": _percentile(components[name], 95),
        }
    fingerprint: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "images": {
            "count": len(ids),
            "sampled": len(sample),
            "height_p50": float(np.median(heights)),
            "width_p50": float(np.median(widths)),
            "height_range": [int(heights.min()), int(heights.max())],
            "width_range": [int(widths.min()), int(widths.max())],
            "distinct_sizes": len(set(sizes.values())),
            "channels": channel_counts,
        },
        "classes": per_class,
        "empty_pair_share": round(float(1 - present.to_numpy().mean()), 4),
        "empty_image_share": round(float((~present.any(axis=1)).mean()), 4),
        "overlap_share": round(overlapping / max(len(sample), 1), 4),
        # Every image, on the runs (no decoding): softmax needs exclusive classes everywhere.
        "overlapping_images": sum(
            overlapping_pair([str(rles.at[i, name]) for name in classes], f"image {i}") is not None
            for i in ids
        ),
    }
    if test_folder is not None:
        names = list_image_files(test_folder)
        test_sizes = {read_image_size(Path(test_folder) / name) for name in names}
        fingerprint["test_images"] = {
            "count": len(names),
            "distinct_sizes": len(test_sizes),
            "sizes": sorted([list(s) for s in test_sizes])[:10],
        }
    return fingerprint

"""A per-experiment disk cache of resized images and masks (pure: no TensorFlow).

Each image is decoded and resized once per experiment and size; the results live in
memory-mapped uint8 arrays (``images.u8`` (N, H, W, 3), ``masks.u8`` (N, H, W, C)) so
that training reads a crop with one slice, and a 5,546-image set never sits in RAM.
A cache is built under a temporary name and renamed; a dead builder's leftovers are
removed; a cache whose inputs changed (files, sizes, masks) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.core.atomic import publish_directory
from pipeline.core.images import (
    cache_path,
    files_fingerprint,
    read_image,
    resize_image,
    resolve_image_path,
)
from pipeline.core.masks import decode_masks, resize_masks, rles_by_image
from pipeline.run.run_lock import pid_alive

if TYPE_CHECKING:  # only types of these are needed here
    from pipeline.core.config import Config
    from pipeline.run.experiment import Experiment

log = logging.getLogger(__name__)

# JPEG decoding and resizing release the GIL: one thread per core when caching test
# images (3,698 Clouds test images of 1400x2100 take minutes on two).
CACHE_WORKERS = os.cpu_count() or 2

CACHE_VERSION = 5


@dataclass(frozen=True)
class ImageCache:
    """Resized images (and masks) of one image set, memory-mapped read-only.

    ``images`` (N, H, W, 3) uint8, ``masks`` (N, H, W, C) uint8 or None,
    ``original_sizes`` (N, 2) int: each image's size before resizing; ``void`` (N, H, W)
    uint8, 1 at void pixels (``Experiment.void``), or None where no image has any.
    """

    directory: Path
    image_ids: list[str]
    original_sizes: np.ndarray
    images: np.ndarray
    masks: np.ndarray | None
    void: np.ndarray | None = None

    def index_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``image_ids`` in the cache (KeyError naming a missing id)."""
        lookup = {image_id: i for i, image_id in enumerate(self.image_ids)}
        missing = [i for i in image_ids if i not in lookup]
        if missing:
            raise KeyError(f"{len(missing)} image ids not in cache {self.directory}: {missing[:5]}")
        return np.array([lookup[i] for i in image_ids], dtype=np.int64)


def build_cache(
    cache_dir: Path,
    name: str,
    image_folder: Path,
    image_ids: Sequence[str],
    size: Sequence[int],
    rles: dict[str, list[str]] | None = None,
    workers: int = 2,
    masks_key: str = "",
    masks_source: str = "the mask CSV",
    classes: Sequence[str] | None = None,
    void: dict[str, str] | None = None,
) -> ImageCache:
    """Open the cache of ``image_ids`` at ``size``, building it first if needed.

    ``void`` (image_id -> RLE of void pixels at the image's own size) adds ``void.npy``.

    ``rles`` (image_id -> per-class RLE at the image's own size) adds the masks. The
    cache is built under a temporary name and renamed, so a crash never leaves a cache
    that looks complete. The cache is rebuilt when anything it was made from changed:
    the ids, the size, the image files (names, sizes, modification times) or
    ``masks_key`` (what the masks were decoded from: ``experiment.data_key``). A mask
    that does not fit its image is a ValueError naming the image, its file and size, the
    class (``classes``) and ``masks_source``.
    """
    directory = cache_path(cache_dir, name, size)
    n_classes = len(next(iter(rles.values()))) if rles else 0
    meta = {
        "version": CACHE_VERSION,
        "size": [int(size[0]), int(size[1])],
        "n_images": len(image_ids),
        "n_classes": n_classes,
        "image_folder": str(Path(image_folder).resolve()),
        "files": files_fingerprint(image_folder, image_ids),
        "masks_key": masks_key if rles else "",
    }
    void = {k: v for k, v in (void or {}).items() if v} if rles else {}
    if void:  # only then: the caches of sets without void pixels stay valid
        meta["void"] = True
    if directory.is_dir():
        cache = _open_if_matching(directory, meta, image_ids)
        if cache is not None:
            return cache
        log.info(
            "cache %s is stale (other images, image files, masks or size); rebuilding",
            directory,
        )
        shutil.rmtree(directory)
    # A name of this process's own: several fold jobs or workers may build it at once.
    _remove_dead_builds(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    height, width = (int(v) for v in size)
    images = np.lib.format.open_memmap(
        tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(image_ids), height, width, 3)
    )
    masks = (
        np.lib.format.open_memmap(
            tmp / "masks.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(len(image_ids), height, width, n_classes),
        )
        if rles
        else None
    )
    void_pixels = (
        np.lib.format.open_memmap(
            tmp / "void.npy", mode="w+", dtype=np.uint8, shape=(len(image_ids), height, width)
        )
        if void
        else None
    )
    sizes = np.zeros((len(image_ids), 2), dtype=np.int64)

    def load(i: int) -> None:
        image_id = image_ids[i]
        path = resolve_image_path(image_folder, image_id)
        image = read_image(path)
        sizes[i] = image.shape[:2]
        images[i] = resize_image(image, (height, width))
        if masks is not None:
            assert rles is not None
            if image_id not in rles:
                raise KeyError(f"no mask rows for image {image_id!r}")
            try:
                stack = decode_masks(rles[image_id], (image.shape[0], image.shape[1]))
            except ValueError as exc:
                raise ValueError(
                    f"{masks_source}: a mask of image {image_id!r} does not fit the image "
                    f"file {str(path)!r} ({image.shape[0]}x{image.shape[1]}): "
                    f"{_which_class(rles[image_id], image.shape[:2], classes)}{exc}"
                ) from None
            masks[i] = resize_masks(stack, (height, width))
            if void_pixels is not None and image_id in void:
                shape = (image.shape[0], image.shape[1])
                void_pixels[i] = resize_masks(
                    decode_masks([void[image_id]], shape), (height, width)
                )[..., 0]

    log.info(
        "caching %d images of %s at %dx%d in %s", len(image_ids), name, height, width, directory
    )
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(load, range(len(image_ids))))
    except BaseException:
        del images, masks, void_pixels  # close the memory maps before removing their files
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    images.flush()
    if masks is not None:
        masks.flush()
    if void_pixels is not None:
        void_pixels.flush()
    pd.DataFrame({"image_id": list(image_ids), "height": sizes[:, 0], "width": sizes[:, 1]}).to_csv(
        tmp / "index.csv", index=False
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        publish_directory(tmp, directory)
    except OSError:
        # Another process published the same cache first: use it, drop this copy.
        if not directory.is_dir() or _open_if_matching(directory, meta, image_ids) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    cache = _open_if_matching(directory, meta, image_ids)
    assert cache is not None
    return cache


def _remove_dead_builds(directory: Path) -> None:
    """Remove the half-built copies of ``directory`` left by dead processes of this host."""
    prefix = f"{directory.name}.tmp-{socket.gethostname()}-"
    if not directory.parent.is_dir():
        return
    for path in directory.parent.glob(prefix + "*"):
        pid = path.name[len(prefix) :]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _which_class(rles: Sequence[str], shape: tuple[int, ...], classes: Sequence[str] | None) -> str:
    """``"class 'Fish': "`` for the first RLE that does not decode at ``shape``."""
    for c, encoded in enumerate(rles):
        try:
            decode_masks([encoded], (int(shape[0]), int(shape[1])))
        except ValueError:
            name = classes[c] if classes is not None and c < len(classes) else str(c)
            return f"class {name!r}: "
    return ""


def _open_if_matching(
    directory: Path, meta: dict[str, Any], image_ids: Sequence[str]
) -> ImageCache | None:
    meta_file = directory / "meta.json"
    if not meta_file.is_file() or json.loads(meta_file.read_text()) != meta:
        return None
    index = pd.read_csv(directory / "index.csv", dtype={"image_id": str}, keep_default_na=False)
    if index["image_id"].tolist() != list(image_ids):
        return None
    masks_file = directory / "masks.npy"
    void_file = directory / "void.npy"
    return ImageCache(
        directory=directory,
        image_ids=index["image_id"].tolist(),
        original_sizes=index[["height", "width"]].to_numpy(),
        images=np.load(directory / "images.npy", mmap_mode="r"),
        masks=np.load(masks_file, mmap_mode="r") if masks_file.exists() else None,
        void=np.load(void_file, mmap_mode="r") if void_file.exists() else None,
    )


def training_cache(config: Config, exp: Experiment, size: Sequence[int]) -> ImageCache:
    """The training images and masks at ``size``, decoded once per experiment."""
    return build_cache(
        exp.cache_dir,
        "train",
        Path(config.data.train_images),
        exp.image_ids,
        size,
        exp.rles(),
        masks_key=exp.data_key,
        masks_source=(
            f"mask folder {str(config.data.masks)!r}"
            if config.data.masks is not None
            else f"mask CSV {str(config.data.train_csv)!r}"
        ),
        classes=exp.classes,
        void=exp.void,
    )


class _StackedRows:
    """Rows of several arrays, one after the other, read one at a time (no copy)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"row {index} out of range for {self.shape[0]} rows")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - int(self.starts[part])]


def stack_caches(first: ImageCache, second: ImageCache) -> ImageCache:
    """One training source over two caches at the same size: ``second``'s rows follow
    ``first``'s (row ``len(first.image_ids) + i`` is ``second``'s row i)."""
    if first.images.shape[1:] != second.images.shape[1:]:
        raise ValueError(
            f"caches {first.directory} and {second.directory} hold images of different "
            f"sizes: {first.images.shape[1:3]} and {second.images.shape[1:3]}"
        )
    if first.masks is None or second.masks is None:
        raise ValueError("both caches must hold masks to train on them")
    void = None
    if first.void is not None or second.void is not None:
        parts = [
            c.void if c.void is not None else np.zeros(c.images.shape[:3], np.uint8)
            for c in (first, second)
        ]
        void = _StackedRows(parts)
    stacked: Any = ImageCache(
        first.directory,
        [*first.image_ids, *second.image_ids],
        np.concatenate([first.original_sizes, second.original_sizes]),
        _StackedRows([first.images, second.images]),  # type: ignore[arg-type]
        _StackedRows([first.masks, second.masks]),  # type: ignore[arg-type]
        void,  # type: ignore[arg-type]
    )
    return stacked


def pseudo_label_cache(config: Config, exp: Experiment, size: Sequence[int]) -> ImageCache:
    """The images and masks of ``data.pseudo_labels`` (an ``image_label`` CSV written by
    ``python -m pipeline.pseudo_label``) from ``data.pseudo_images`` (default: the test
    images), at ``size``. Its images must not be training images."""
    from pipeline.run.experiment import read_pseudo_labels  # the run layer above

    table = read_pseudo_labels(config, exp).table
    assert config.data.pseudo_labels is not None  # read_pseudo_labels refuses null
    path = Path(config.data.pseudo_labels)
    ids = sorted(table["image_id"].unique())
    folder = Path(config.data.pseudo_images or config.data.test_images)
    return build_cache(
        exp.cache_dir,
        "pseudo",
        folder,
        ids,
        size,
        rles_by_image(table, exp.classes),
        masks_key=hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        masks_source=f"pseudo-label CSV {str(path)!r}",
        classes=exp.classes,
    )

"""Images and masks for the model: a per-experiment disk cache and the tf.data pipelines.

Each image is decoded and resized once per experiment and size; the results live in
memory-mapped uint8 arrays (``images.u8`` (N, H, W, 3), ``masks.u8`` (N, H, W, C)) so
that training reads a crop with one slice, and a 5,546-image set never sits in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd

from pipeline.core.images import cache_path, files_fingerprint, read_image, resolve_image_path
from pipeline.core.masks import decode_masks, resize_masks, rles_by_image
from pipeline.core.sample_order import SampleOrder
from pipeline.nn.keras_backend import tf
from pipeline.run.run_lock import pid_alive

if TYPE_CHECKING:  # the run layer above; only its types are needed here
    from pipeline.core.config import Config
    from pipeline.run.experiment import Experiment

log = logging.getLogger(__name__)

CACHE_VERSION = 2


@dataclass(frozen=True)
class ImageCache:
    """Resized images (and masks) of one image set, memory-mapped read-only.

    ``images`` (N, H, W, 3) uint8, ``masks`` (N, H, W, C) uint8 or None,
    ``original_sizes`` (N, 2) int: each image's size before resizing.
    """

    directory: Path
    image_ids: list[str]
    original_sizes: np.ndarray
    images: np.ndarray
    masks: np.ndarray | None

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
) -> ImageCache:
    """Open the cache of ``image_ids`` at ``size``, building it first if needed.

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
    sizes = np.zeros((len(image_ids), 2), dtype=np.int64)

    def load(i: int) -> None:
        image_id = image_ids[i]
        path = resolve_image_path(image_folder, image_id)
        image = read_image(path)
        sizes[i] = image.shape[:2]
        images[i] = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
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

    log.info(
        "caching %d images of %s at %dx%d in %s", len(image_ids), name, height, width, directory
    )
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(load, range(len(image_ids))))
    except BaseException:
        del images, masks  # close the memory maps before removing their files
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    images.flush()
    if masks is not None:
        masks.flush()
    pd.DataFrame({"image_id": list(image_ids), "height": sizes[:, 0], "width": sizes[:, 1]}).to_csv(
        tmp / "index.csv", index=False
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, directory)
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
    return ImageCache(
        directory=directory,
        image_ids=index["image_id"].tolist(),
        original_sizes=index[["height", "width"]].to_numpy(),
        images=np.load(directory / "images.npy", mmap_mode="r"),
        masks=np.load(masks_file, mmap_mode="r") if masks_file.exists() else None,
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
        masks_source=f"mask CSV {str(config.data.train_csv)!r}",
        classes=exp.classes,
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
    stacked: Any = ImageCache(
        first.directory,
        [*first.image_ids, *second.image_ids],
        np.concatenate([first.original_sizes, second.original_sizes]),
        _StackedRows([first.images, second.images]),  # type: ignore[arg-type]
        _StackedRows([first.masks, second.masks]),  # type: ignore[arg-type]
    )
    return stacked


def pseudo_label_cache(config: Config, exp: Experiment, size: Sequence[int]) -> ImageCache:
    """The images and masks of ``data.pseudo_labels`` (an ``image_label`` CSV written by
    ``python -m pipeline.pseudo_label``) from ``data.pseudo_images`` (default: the test
    images), at ``size``. Its images must not be training images."""
    from pipeline.run.experiment import read_pseudo_labels  # the run layer above

    path = Path(config.data.pseudo_labels)
    table = read_pseudo_labels(config, exp).table
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


def build_augmentation(specs: Sequence[dict[str, Any]]) -> A.Compose:
    """An albumentations pipeline from config specs ``[{name, params}]``."""
    transforms = []
    for i, spec in enumerate(specs):
        cls = getattr(A, spec["name"], None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise ValueError(
                f"augment[{i}].name must name an albumentations transform; got {spec['name']!r}"
            )
        try:
            # albumentations only warns about unknown arguments; a typo must not pass.
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*not valid for transform.*")
                transforms.append(cls(**spec["params"]))
        except (TypeError, ValueError, UserWarning) as exc:
            raise ValueError(
                f"augment[{i}] ({spec['name']}): bad params {spec['params']}: {exc}"
            ) from exc
    return A.Compose(transforms)


def reseed_augmentation(
    augment: A.BasicTransform | A.BaseCompose, rng: np.random.Generator
) -> None:
    """Give ``augment`` and every transform in it its own seed drawn from ``rng``.

    albumentations' ``set_random_seed`` hands one seed to every transform of a Compose,
    so each draws the same first number: with two flips at p=0.5 both fired or neither
    did (only the identity and the 180-degree turn were ever seen, never a single
    flip), and any third transform fired with them. Seeding each transform apart makes
    their decisions independent, and still a pure function of ``rng``.
    """
    augment.set_random_seed(int(rng.integers(2**31)))
    for child in getattr(augment, "transforms", ()):
        reseed_augmentation(child, rng)


class CropSampler:
    """Draws one training sample: a random crop of a cached image, then augmentation.

    Deterministic per sample: the crop and the augmentation are seeded from
    (seed, sample counter), so a run with the same seed sees the same samples.
    """

    def __init__(
        self,
        cache: ImageCache,
        crop_size: Sequence[int],
        augment: A.Compose | None,
        seed: int,
    ) -> None:
        if cache.masks is None:
            raise ValueError(f"cache {cache.directory} has no masks; cannot train on it")
        height, width = cache.images.shape[1:3]
        if crop_size[0] > height or crop_size[1] > width:
            raise ValueError(
                f"train.crop_size {list(crop_size)} is larger than data.image_size "
                f"{[height, width]}"
            )
        self.cache = cache
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.augment = augment
        self.seed = seed
        self._lock = threading.Lock()

    def __call__(self, index: np.int64, counter: np.int64) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(counter)])
        image = self.cache.images[int(index)]
        mask = self.cache.masks[int(index)]  # type: ignore[index]
        ch, cw = self.crop_size
        top = int(rng.integers(0, image.shape[0] - ch + 1))
        left = int(rng.integers(0, image.shape[1] - cw + 1))
        image = np.ascontiguousarray(image[top : top + ch, left : left + cw])
        mask = np.ascontiguousarray(mask[top : top + ch, left : left + cw])
        if self.augment is not None:
            # One pipeline object is shared by the parallel map; reseeding and calling
            # must not interleave, or samples stop being reproducible.
            with self._lock:
                reseed_augmentation(self.augment, rng)
                out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask


def sample_numbers(start: int) -> tf.data.Dataset:
    """int64 sample numbers ``start, start + 1, ...`` (endless)."""
    return tf.data.Dataset.counter(start=int(start), dtype=tf.int64)


def make_train_dataset(
    sampler: CropSampler,
    indices: np.ndarray,
    batch_size: int,
    seed: int,
    num_parallel_calls: int,
    prefetch: int,
    start: int = 0,
) -> tf.data.Dataset:
    """Endless shuffled batches of (image float32 (B,h,w,3) 0-255, mask float32 (B,h,w,C)).

    Sample ``n`` (from ``start``) is image ``SampleOrder(indices, seed)(n)`` cropped and
    augmented from ``(sampler.seed, n)``: the stream from ``start`` is the same whether
    or not the samples before it were drawn in this process.
    """
    n_classes = sampler.cache.masks.shape[-1]  # type: ignore[union-attr]
    ch, cw = sampler.crop_size
    order = SampleOrder(indices, seed)

    def draw(n: np.int64) -> tuple[np.ndarray, np.ndarray]:
        return sampler(order(n), n)

    def load(n: Any) -> tuple[Any, Any]:
        image, mask = tf.numpy_function(draw, [n], [tf.uint8, tf.uint8])
        image.set_shape((ch, cw, 3))
        mask.set_shape((ch, cw, n_classes))
        return image, mask

    ds = sample_numbers(start).map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(_to_float)
    return ds.prefetch(prefetch)


def batch_for_replicas(
    ds: tf.data.Dataset, n: int, batch_size: int, replicas: int
) -> tf.data.Dataset:
    """``ds.batch(batch_size)`` over ``n`` elements, with no batch smaller than ``replicas``.

    A distribution strategy splits each global batch over its replicas; a final batch
    of fewer elements than replicas leaves a replica an empty slice. TensorFlow's
    oneDNN convolution (on by default on CPUs with AVX-512/AMX) returns its *input* for
    an empty batch, so the next BatchNorm fails ("scale must have the same number of
    elements as the channels of x, got 64 and 3"). Such a remainder is merged into the
    batch before it, so every image is still seen exactly once.
    """
    if n < replicas:
        raise ValueError(
            f"{n} evaluation image(s) cannot be split over {replicas} replicas; use fewer "
            f"devices (train.strategy) or more images per fold (folds.n_splits)"
        )
    remainder = n % batch_size
    if remainder == 0 or remainder >= replicas:
        return ds.batch(batch_size)
    head = n - batch_size - remainder
    return ds.take(head).batch(batch_size).concatenate(ds.skip(head).batch(batch_size + remainder))


def make_eval_dataset(
    cache: ImageCache,
    indices: np.ndarray,
    batch_size: int,
    crop: Sequence[int] | None = None,
    replicas: int = 1,
) -> tf.data.Dataset:
    """Batches of whole cached images (or their centre crop) and masks, in order, once.

    ``batch_size`` is the global batch; no batch is smaller than ``replicas``.
    """
    if cache.masks is None:
        raise ValueError(f"cache {cache.directory} has no masks; cannot validate on it")
    height, width = cache.images.shape[1:3]
    top, left, ch, cw = 0, 0, height, width
    if crop is not None:
        ch, cw = int(crop[0]), int(crop[1])
        top, left = (height - ch) // 2, (width - cw) // 2
    n_classes = cache.masks.shape[-1]
    images, masks = cache.images, cache.masks

    def load(index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        i = int(index)
        return (
            np.ascontiguousarray(images[i, top : top + ch, left : left + cw]),
            np.ascontiguousarray(masks[i, top : top + ch, left : left + cw]),
        )

    def load_tf(index: Any) -> tuple[Any, Any]:
        image, mask = tf.numpy_function(load, [index], [tf.uint8, tf.uint8])
        image.set_shape((ch, cw, 3))
        mask.set_shape((ch, cw, n_classes))
        return image, mask

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, dtype=np.int64))
    ds = ds.map(load_tf, num_parallel_calls=2, deterministic=True)
    ds = batch_for_replicas(ds, len(indices), batch_size, replicas)
    return ds.map(_to_float).prefetch(2)


def _to_float(image: Any, mask: Any) -> tuple[Any, Any]:
    return tf.cast(image, tf.float32), tf.cast(mask, tf.float32)

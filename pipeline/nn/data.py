"""Images and masks for the model: augmentation, crop sampling and the tf.data pipelines
over an image cache (``run.image_cache``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np

from pipeline.core.sample_order import SampleOrder
from pipeline.nn.keras_backend import KERAS3, tf
from pipeline.run.image_cache import ImageCache

log = logging.getLogger(__name__)


def build_augmentation(specs: Sequence[Mapping[str, Any]]) -> A.Compose:
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


def with_void_channel(cache: ImageCache, row: int, mask: np.ndarray) -> np.ndarray:
    """(H, W, C+1) uint8: row ``row``'s (H, W, C) ``mask`` and, last, its void pixels
    (``cache.void``; zeros without): a softmax model's target (``losses.split_exclusive``)."""
    void = (
        np.asarray(cache.void[row])
        if cache.void is not None
        else np.zeros(mask.shape[:2], dtype=np.uint8)
    )
    return np.concatenate([mask, void[..., None]], axis=-1)


def target_channels(cache: ImageCache, exclusive: bool) -> int:
    """Channels of the training targets: the classes, and the void channel when
    ``exclusive`` (a softmax model)."""
    return int(cache.masks.shape[-1]) + (1 if exclusive else 0)  # type: ignore[union-attr]


class CropSampler:
    """Draws one training sample: a random crop of a cached image, then augmentation.

    Deterministic per sample: the crop and the augmentation are seeded from
    (seed, sample counter), so a run with the same seed sees the same samples.
    ``exclusive`` (a softmax model): the mask gains the void channel
    (``with_void_channel``), cropped and augmented with it.
    """

    def __init__(
        self,
        cache: ImageCache,
        crop_size: Sequence[int],
        augment: A.Compose | None,
        seed: int,
        exclusive: bool = False,
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
        self.exclusive = exclusive
        self._lock = threading.Lock()

    def __call__(self, index: np.int64, counter: np.int64) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(counter)])
        image = self.cache.images[int(index)]
        mask = self.cache.masks[int(index)]  # type: ignore[index]
        if self.exclusive:
            mask = with_void_channel(self.cache, int(index), mask)
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
    n_classes = target_channels(sampler.cache, sampler.exclusive)
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


def replica_batch_sizes(n: int, batch_size: int, replicas: int) -> list[int]:
    """The sizes of ``n`` elements' evaluation batches, ``batch_size`` where possible.

    A distribution strategy splits each global batch over its replicas. No batch is
    smaller than ``replicas``: a replica with an empty slice breaks TensorFlow's oneDNN
    convolution (on by default on CPUs with AVX-512/AMX), which returns its *input* for
    an empty batch, so the next BatchNorm fails ("scale must have the same number of
    elements as the channels of x, got 64 and 3"). Such a remainder takes ``replicas``
    elements from the batch before it (or joins it, when that batch is too small).
    And the first batch splits evenly whenever ``n`` allows it: Keras 3 reduces the
    first batch of every evaluation across the replicas to build the model, which fails
    on unequal slices ("Inputs to operation AddN must have the same size and shape").
    """
    if n < replicas:
        raise ValueError(
            f"{n} evaluation image(s) cannot be split over {replicas} replicas; use fewer "
            f"devices (train.strategy) or more images per fold (folds.n_splits)"
        )
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if replicas == 1:
        return sizes
    if sizes[-1] < replicas:
        if sizes[-2] - replicas >= replicas:
            sizes[-2:] = [sizes[-2] - replicas, sizes[-1] + replicas]
        else:
            sizes[-2:] = [sizes[-2] + sizes[-1]]
    if sizes[0] % replicas and len(sizes) == 1 and n >= 2 * replicas:
        first = replicas * (n // replicas - 1)
        sizes = [first, n - first]
    return sizes


def batch_for_replicas(
    ds: tf.data.Dataset, n: int, batch_size: int, replicas: int
) -> tf.data.Dataset:
    """``ds.batch(batch_size)`` over ``n`` elements, in ``replica_batch_sizes``: every
    element once, in order, no replica ever empty."""
    sizes = replica_batch_sizes(n, batch_size, replicas)
    if KERAS3 and sizes[0] % replicas:
        raise ValueError(
            f"{n} evaluation images cannot be split evenly over {replicas} replicas, which "
            f"Keras 3 needs for the first batch; use at least {2 * replicas} images per "
            f"fold (folds.n_splits) or fewer devices (train.strategy)"
        )
    batched, start = None, 0
    for size, run in itertools.groupby(sizes):
        count = len(list(run))
        part = ds.skip(start).take(size * count).batch(size)
        batched = part if batched is None else batched.concatenate(part)
        start += size * count
    return batched


def make_eval_dataset(
    cache: ImageCache,
    indices: np.ndarray,
    batch_size: int,
    crop: Sequence[int] | None = None,
    replicas: int = 1,
    exclusive: bool = False,
) -> tf.data.Dataset:
    """Batches of whole cached images (or their centre crop) and masks, in order, once.

    ``batch_size`` is the global batch; no batch is smaller than ``replicas``.
    ``exclusive`` (a softmax model): the masks carry the void channel last.
    """
    if cache.masks is None:
        raise ValueError(f"cache {cache.directory} has no masks; cannot validate on it")
    height, width = cache.images.shape[1:3]
    top, left, ch, cw = 0, 0, height, width
    if crop is not None:
        ch, cw = int(crop[0]), int(crop[1])
        top, left = (height - ch) // 2, (width - cw) // 2
    n_classes = target_channels(cache, exclusive)
    images, masks = cache.images, cache.masks

    def load(index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        i = int(index)
        mask = masks[i, top : top + ch, left : left + cw]
        if exclusive:
            void = (
                cache.void[i, top : top + ch, left : left + cw] if cache.void is not None else None
            )
            if void is None:
                void = np.zeros(mask.shape[:2], dtype=np.uint8)
            mask = np.concatenate([mask, void[..., None]], axis=-1)
        return (
            np.ascontiguousarray(images[i, top : top + ch, left : left + cw]),
            np.ascontiguousarray(mask),
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

"""The image cache and the tf.data input pipelines."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.rle import encode
from pipeline.nn.data import (
    CropSampler,
    batch_for_replicas,
    build_augmentation,
    make_eval_dataset,
    make_train_dataset,
    replica_batch_sizes,
)
from pipeline.run.image_cache import ImageCache, build_cache


@pytest.fixture
def image_set(tmp_path: Path) -> tuple[Path, list[str], dict[str, list[str]]]:
    """Three PNGs of different sizes with one box mask each (class 0) and class 1 empty."""
    folder = tmp_path / "images"
    folder.mkdir()
    rles = {}
    for i, (h, w) in enumerate([(40, 60), (50, 50), (64, 96)]):
        image = np.full((h, w, 3), 30 * i, dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), image)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[: h // 2, : w // 2] = 1
        rles[f"img{i}"] = [encode(mask), ""]
    return folder, sorted(rles), rles


def test_cache_resizes_once_and_keeps_original_sizes(tmp_path, image_set):
    folder, ids, rles = image_set
    cache = build_cache(tmp_path / "cache", "train", folder, ids, [32, 64], rles)
    assert cache.images.shape == (3, 32, 64, 3) and cache.masks.shape == (3, 32, 64, 2)
    assert cache.original_sizes.tolist() == [[40, 60], [50, 50], [64, 96]]
    assert cache.images[1].mean() == pytest.approx(30, abs=1)
    # The top-left quarter is the mask after resizing, class 1 stays empty.
    assert cache.masks[2, :16, :32, 0].all() and not cache.masks[2, 16:, :, 0].any()
    assert not cache.masks[..., 1].any()
    stamp = (cache.directory / "images.npy").stat().st_mtime_ns
    again = build_cache(tmp_path / "cache", "train", folder, ids, [32, 64], rles)
    assert (again.directory / "images.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = build_cache(tmp_path / "cache", "train", folder, ids[:2], [32, 64], rles)
    assert len(other.image_ids) == 2  # another image set rebuilds the cache


def test_cache_names_a_missing_image(tmp_path, image_set):
    folder, ids, _ = image_set
    with pytest.raises(FileNotFoundError, match="nope"):
        build_cache(tmp_path / "cache", "train", folder, [*ids, "nope"], [32, 64])
    assert not any((tmp_path / "cache").glob("train_32x64"))  # nothing half-built is published


def test_unknown_augmentation_is_an_error():
    with pytest.raises(ValueError, match=r"augment\[0\].name must name an albumentations"):
        build_augmentation([{"name": "NoSuchFlip", "params": {}}])
    with pytest.raises(ValueError, match=r"augment\[0\] \(HorizontalFlip\): bad params"):
        build_augmentation([{"name": "HorizontalFlip", "params": {"q": 1}}])


def test_samples_are_reproducible_and_batches_have_the_crop_shape(tmp_path, image_set):
    folder, ids, rles = image_set
    cache = build_cache(tmp_path / "cache", "train", folder, ids, [32, 64], rles)
    augment = build_augmentation(
        [
            {"name": "HorizontalFlip", "params": {"p": 0.5}},
            {"name": "VerticalFlip", "params": {"p": 0.5}},
        ]
    )
    sampler = CropSampler(cache, [32, 32], augment, seed=3)
    first = [sampler(np.int64(2), np.int64(n)) for n in range(6)]
    second = [sampler(np.int64(2), np.int64(n)) for n in range(6)]
    for (a_img, a_mask), (b_img, b_mask) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)
    ds = make_train_dataset(
        sampler, np.arange(3), batch_size=2, seed=0, num_parallel_calls=2, prefetch=1
    )
    images, masks = next(iter(ds))
    assert images.shape == (2, 32, 32, 3) and masks.shape == (2, 32, 32, 2)
    with pytest.raises(ValueError, match="larger than data.image_size"):
        CropSampler(cache, [64, 64], None, seed=0)


def test_eval_dataset_covers_each_image_once_in_order(tmp_path, image_set):
    folder, ids, rles = image_set
    cache = build_cache(tmp_path / "cache", "train", folder, ids, [32, 64], rles)
    batches = list(make_eval_dataset(cache, np.array([2, 0, 1]), batch_size=2, crop=[32, 32]))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    first = batches[0][0].numpy()
    np.testing.assert_array_equal(first[0], cache.images[2, :, 16:48].astype(np.float32))


@pytest.mark.parametrize(
    ("n", "batch", "replicas", "sizes"),
    [
        (9, 8, 2, [6, 3]),  # a remainder of 1 < 2 replicas takes 2 from the batch before
        (17, 8, 2, [8, 6, 3]),
        (33, 8, 4, [8, 8, 8, 4, 5]),
        (5, 4, 2, [2, 3]),
        (7, 2, 2, [2, 2, 3]),  # the batch before is too small to give: joined
        (10, 8, 2, [8, 2]),  # a remainder of 2 gives each replica one image
        (16, 8, 2, [8, 8]),
        (9, 8, 1, [8, 1]),  # one replica: plain batching
        (9, 16, 2, [6, 3]),  # one uneven batch: the first is made even (Keras 3 needs it)
        (3, 8, 2, [3]),  # cannot be: fewer than 2 x replicas
    ],
)
def test_no_eval_batch_leaves_a_replica_empty(n, batch, replicas, sizes):
    from pipeline.nn.keras_backend import KERAS3, tf

    assert replica_batch_sizes(n, batch, replicas) == sizes
    if KERAS3 and sizes[0] % replicas:
        with pytest.raises(ValueError, match=f"{n} evaluation images cannot be split evenly"):
            batch_for_replicas(tf.data.Dataset.range(n), n, batch, replicas)
        return
    ds = batch_for_replicas(tf.data.Dataset.range(n), n, batch, replicas)
    batches = [b.numpy().tolist() for b in ds]
    assert [len(b) for b in batches] == sizes
    assert [x for b in batches for x in b] == list(range(n))  # each once, in order


def test_fewer_eval_images_than_replicas_is_an_error():
    from pipeline.nn.keras_backend import tf

    with pytest.raises(ValueError, match="1 evaluation image.*2 replicas"):
        batch_for_replicas(tf.data.Dataset.range(1), 1, 8, 2)


def test_a_stream_started_at_epoch_two_continues_the_uninterrupted_one(tmp_path, image_set):
    """What --resume and a new unfreezing phase rely on: the samples of epoch 3 do not
    depend on whether epochs 1-2 ran in this process."""
    from pipeline.core.sample_order import first_sample

    folder, ids, rles = image_set
    cache = build_cache(tmp_path / "cache", "train", folder, ids, [32, 64], rles)
    augment = build_augmentation([{"name": "HorizontalFlip", "params": {"p": 0.5}}])
    sampler = CropSampler(cache, [32, 32], augment, seed=5)
    steps, batch = 2, 2

    def stream(start: int) -> list[np.ndarray]:
        ds = make_train_dataset(sampler, np.arange(3), batch, 9, 2, 1, start=start)
        return [images.numpy() for images, _ in ds.take(steps)]

    whole = make_train_dataset(sampler, np.arange(3), batch, 9, 2, 1)
    uninterrupted = [images.numpy() for images, _ in whole.take(3 * steps)]
    resumed = stream(first_sample(2, steps, batch))
    for a, b in zip(uninterrupted[2 * steps :], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(uninterrupted[0], resumed[0])  # not restarted at sample 0


def test_flips_are_drawn_independently_and_reproducibly():
    """Two flips at p=0.5 give the four orientations about equally often (albumentations
    seeds every transform of a Compose alike unless each is reseeded apart)."""
    n = 40
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[:, 0, 0] = 255  # a marker in the top-left corner
    masks = np.zeros((n, 8, 8, 1), np.uint8)
    masks[:, 0, 0] = 1
    cache = ImageCache(Path("."), [str(i) for i in range(n)], np.zeros((n, 2)), images, masks)
    flips = [
        {"name": "HorizontalFlip", "params": {"p": 0.5}},
        {"name": "VerticalFlip", "params": {"p": 0.5}},
    ]
    sampler = CropSampler(cache, (8, 8), build_augmentation(flips), seed=3)
    corners: dict[tuple[int, int], int] = {}
    for k in range(400):
        image, mask = sampler(np.int64(k % n), np.int64(k))
        row, col = (int(v) for v in np.argwhere(image[:, :, 0] == 255)[0])
        assert mask[row, col, 0] == 1  # the mask moved with the image
        corners[row, col] = corners.get((row, col), 0) + 1
    assert set(corners) == {(0, 0), (0, 7), (7, 0), (7, 7)}
    assert min(corners.values()) > 60  # 100 expected each
    again = CropSampler(cache, (8, 8), build_augmentation(flips), seed=3)
    np.testing.assert_array_equal(sampler(np.int64(5), np.int64(5))[0], again(5, 5)[0])

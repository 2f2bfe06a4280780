"""A brief timed train step and the machine's devices, for ``foldseg plan`` (Keras layer).

``time_train_step`` builds the config's segmentation model at a crop size, compiles it
with the config's loss and optimizer, and runs a few ``train_on_batch`` calls on random
data: the memory one more image takes (peak GPU memory, or the process's peak resident
memory on a CPU) between two small batches, then the seconds per step at the batch the
plan chooses from that memory.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.core.config import Config
from pipeline.nn.keras_backend import tf
from pipeline.nn.losses import get_loss
from pipeline.nn.model import build_model
from pipeline.nn.optim import make_optimizer

# Activation memory a U-Net keeps per input pixel for the backward pass, a floor for a
# CPU measurement the allocator hides (bytes per pixel; EfficientNet-B0 at 64x64).
_FLOOR_BYTES_PER_PIXEL = 400


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def time_train_step(
    config: Config,
    n_classes: int,
    crop: Sequence[int],
    batch_for: Callable[[float], int],
    memory_batches: tuple[int, int] = (2, 4),
    steps: int = 3,
    cores: int = 1,
) -> dict[str, Any]:
    """Time the config's train step at ``crop`` on random images.

    The memory one more image takes is measured between ``memory_batches``; the step is
    then timed at ``batch_for(bytes_per_image)``, the batch the plan will train at (per
    image, a step at batch 4 costs several times one at batch 16 on a CPU).

    Returns:
        ``batch`` (the timed batch), ``s_per_step`` (its median wall time over ``steps``
        after one warm-up step; on a CPU at most its CPU time over ``cores``, what the
        step takes on a quiet machine), ``s_per_step_cpu`` (the process's CPU seconds per
        step: what one single-thread fold process takes), ``s_first_step`` (the first
        step at the crop, tracing included), ``bytes_per_image``, ``backbone`` and
        ``device`` ("GPU" or "CPU").
    """
    height, width = int(crop[0]), int(crop[1])
    model = build_model(config, n_classes, (height, width))
    model.compile(optimizer=make_optimizer(1e-3, 1), loss=get_loss(str(config.train.loss)))
    rng = np.random.default_rng(0)
    on_gpu = bool(tf.config.list_physical_devices("GPU"))

    def batch_of(size: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.uniform(0, 255, (size, height, width, 3)).astype(np.float32)
        masks = (rng.uniform(0, 1, (size, height, width, n_classes)) > 0.7).astype(np.float32)
        return images, masks

    peaks = []
    first = 0.0
    for index, size in enumerate(memory_batches):
        images, masks = batch_of(size)
        if on_gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        model.train_on_batch(images, masks)  # tracing, allocation
        if index == 0:
            # Tracing is mostly one thread: its CPU time is its quiet wall time.
            first = min(time.perf_counter() - start, _cpu_seconds() - cpu_start)
        model.train_on_batch(images, masks)
        if on_gpu:
            peaks.append(int(tf.config.experimental.get_memory_info("GPU:0")["peak"]))
        else:
            peaks.append(_peak_rss_bytes())
    per_image = (peaks[1] - peaks[0]) / (memory_batches[1] - memory_batches[0])
    floor = _FLOOR_BYTES_PER_PIXEL * height * width
    bytes_per_image = float(max(per_image, floor))
    batch = int(batch_for(bytes_per_image))
    images, masks = batch_of(batch)
    model.train_on_batch(images, masks)  # warm-up at the planned batch
    elapsed = []
    cpu_start = _cpu_seconds()
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(images, masks)
        elapsed.append(time.perf_counter() - start)
    cpu = (_cpu_seconds() - cpu_start) / steps
    wall = float(np.median(elapsed))
    # On a CPU shared with other work the wall time measures the load of the moment; the
    # process's CPU time spread over the cores it may use is what a quiet machine takes.
    quiet = cpu / max(cores, 1)
    return {
        "batch": batch,
        "s_per_step": wall if on_gpu else min(wall, quiet),
        "s_per_step_wall": wall,
        "s_per_step_cpu": wall if on_gpu else cpu,
        "s_first_step": first,
        "bytes_per_image": bytes_per_image,
        "bytes_per_image_measured": float(per_image),
        "backbone": str(config.model.backbone),
        "device": "GPU" if on_gpu else "CPU",
        "crop": [height, width],
    }

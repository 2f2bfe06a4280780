"""The plan's budget: how many images a training batch may hold on this machine, how
many fold processes share it, and how many epochs fit a wall-time budget, from the
timed train step (``nn.step_probe``). Pure arithmetic, no framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

EFFECTIVE_BATCH = 16  # images per optimizer step: the recipe's batch x accumulation
MAX_BATCH = 32
MIN_BATCH = 4  # BatchNorm needs a few images per batch
MEMORY_SHARE_CPU, MEMORY_SHARE_GPU = 0.4, 0.7  # of free memory the batch may take
BUDGET_SHARE_TRAINING = 0.6  # of --hours: the segmentation folds; the rest tune/predict
MIN_EPOCHS, MAX_EPOCHS = 3, 60
VALIDATION_COST = 0.35  # a validation pass costs about this share of a training epoch
FIRST_EPOCH_STEPS = 2  # a fold's first epoch traces the train and validation steps: about
#   two probe warm-up steps
SMALL_CROP_PIXELS = 128 * 128  # crops up to this train as two single-thread folds on a CPU


def memory_for_batch(machine: Mapping[str, Any]) -> tuple[float, str]:
    """The bytes a training batch may take on this machine, and where they come from."""
    if machine.get("gpu"):
        free = float(machine.get("gpu_memory_gb") or 8.0) * 2**30 * MEMORY_SHARE_GPU
        return free, f"{MEMORY_SHARE_GPU:.0%} of the GPU's {machine.get('gpu_memory_gb')} GB"
    free = float(machine.get("memory_available_gb") or 4.0) * 2**30 * MEMORY_SHARE_CPU
    return free, f"{MEMORY_SHARE_CPU:.0%} of the {machine.get('memory_available_gb')} GB free"


def fold_training_images(n_images: int, n_splits: int) -> int:
    """The images one fold trains on."""
    return n_images * (n_splits - 1) // n_splits


def plan_batch(bytes_per_image: float, machine: Mapping[str, Any], n_train: int) -> int:
    """The training batch: what fits in memory, at most the recipe's effective batch and a
    quarter of a fold's training images, at least a few images for BatchNorm."""
    fits = max(1, int(memory_for_batch(machine)[0] // max(bytes_per_image, 1.0)))
    return max(1, min(fits, EFFECTIVE_BATCH, MAX_BATCH, max(MIN_BATCH, n_train // 4)))


def parallel_folds(machine: Mapping[str, Any], crop: Sequence[int]) -> int:
    """Two single-thread fold processes for small crops on a multi-core CPU, else one."""
    small = int(crop[0]) * int(crop[1]) <= SMALL_CROP_PIXELS
    return 2 if not machine.get("gpu") and int(machine.get("cores", 1)) >= 2 and small else 1


def plan_epochs(
    step: Mapping[str, Any],
    machine: Mapping[str, Any],
    n_train: int,
    n_splits: int,
    parallel: int,
    hours: float,
    classifier: bool = False,
) -> tuple[int, str]:
    """Epochs that fit the training share of ``hours``, and the arithmetic as the reason.

    A fold's epoch costs its training images x the measured seconds per image at the
    planned batch x (1 + the validation share). With ``parallel`` fold processes on a CPU
    (the step timed at their threads) an image costs the step's CPU time and the folds
    run in folds / parallel waves, rounded up unless ``classifier`` folds fill the last
    wave's idle slots (the job runner starts them as soon as a slot frees); one process
    uses every core (the quiet wall time). Each fold also pays its first epoch's tracing
    once (``s_first_step`` x ``FIRST_EPOCH_STEPS``).
    """
    batch = max(int(step["batch"]), 1)
    on_cpu = not machine.get("gpu")
    if on_cpu and parallel > 1:
        s_per_image = float(step.get("s_per_step_cpu", step["s_per_step"])) / batch
        how = f"{parallel} fold processes"
    else:
        s_per_image = float(step["s_per_step"]) / batch
        how = "all cores in one process"
    waves = n_splits / max(parallel, 1)
    waves = waves if classifier else math.ceil(waves)
    s_per_epoch = n_train * s_per_image * (1 + VALIDATION_COST)
    overhead = float(step.get("s_first_step", 0.0)) * FIRST_EPOCH_STEPS
    budget = hours * 3600 * BUDGET_SHARE_TRAINING
    fit = int(max(budget - waves * overhead, 0.0) // max(s_per_epoch * waves, 1e-9))
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, fit))
    note = "" if epochs == fit else f" (clamped to {MIN_EPOCHS}..{MAX_EPOCHS})"
    return epochs, (
        f"measured {s_per_image * 1000:.0f} ms per image at batch {batch} ({how}): "
        f"{s_per_epoch:.0f} s per fold epoch with validation, {overhead:.0f} s of tracing "
        f"per fold; {n_splits} folds in {waves:g} wave(s) in {BUDGET_SHARE_TRAINING:.0%} of "
        f"{hours:g} h -> {fit}{note}"
    )

"""From a data set's fingerprint and a machine's measurements to a config (pure layer).

``candidate_sizes`` picks the training size before anything is timed; ``plan_choices``
picks every other key from the fingerprint, the machine and the timed train step; each
``Choice`` carries the reason that ``render_config`` writes beside its key. The rules
are plain thresholds, named here once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.core.plan_budget import (
    EFFECTIVE_BATCH,
    MIN_EPOCHS,
    fold_training_images,
    memory_for_batch,
    parallel_folds,
    plan_epochs,
)
from pipeline.core.sample_order import batches_per_pass
from pipeline.core.schema import flips_augment

STRIDE = 32  # U-Net's input sides are multiples of the encoder's stride
# Longest training side by machine: GPU; CPU with at least CPU_MANY_CORES cores; fewer.
MAX_SIDE_GPU, MAX_SIDE_CPU_MANY, MAX_SIDE_CPU_FEW = 512, 256, 96
CPU_MANY_CORES = 8
# The smallest objects (5th percentile area) keep at least this many pixels when shrunk.
MIN_OBJECT_PIXELS = 16
# The shrink rule may grow the side up to this factor of the machine's longest side.
MAX_GROWTH = 2.0
UNEVEN_PRESENCE = 0.1  # presence spread between classes that calls for stratified folds
EMPTY_SHARE_FOR_CLASSIFIER = 0.2  # empty image-class pairs that make a classifier pay
SMALL_OBJECT_FRACTION = 0.01  # median object under 1% of the image: dice loss


@dataclass(frozen=True)
class Choice:
    """One planned key: dotted ``key``, its ``value`` and the ``reason`` shown beside it."""

    key: str
    value: Any
    reason: str


def _round_side(side: float) -> int:
    return max(STRIDE, round(side / STRIDE) * STRIDE)


def max_side(machine: Mapping[str, Any]) -> int:
    """The longest training side the machine affords (GPU, many CPU cores, few)."""
    if machine.get("gpu"):
        return MAX_SIDE_GPU
    return MAX_SIDE_CPU_MANY if int(machine.get("cores", 1)) >= CPU_MANY_CORES else MAX_SIDE_CPU_FEW


def candidate_sizes(
    fingerprint: Mapping[str, Any], machine: Mapping[str, Any]
) -> tuple[Choice, Choice]:
    """``data.image_size`` and ``train.crop_size``: aspect kept, sides multiples of 32,
    the longest side what the machine affords, grown (up to twice that, never past the
    original) so that the smallest objects keep ``MIN_OBJECT_PIXELS`` pixels."""
    images = fingerprint["images"]
    height, width = float(images["height_p50"]), float(images["width_p50"])
    cap = max_side(machine)
    scale = min(1.0, cap / max(height, width))
    reason = (
        f"median image {height:.0f}x{width:.0f}, aspect kept, sides multiples of {STRIDE}, "
        f"longest side {cap} on this machine"
    )
    p5 = [c["area_p5"] for c in fingerprint["classes"].values() if c["area_p5"] is not None]
    if p5:
        smallest = min(p5)
        if smallest * scale**2 < MIN_OBJECT_PIXELS:
            needed = math.sqrt(MIN_OBJECT_PIXELS / max(smallest, 1.0))
            grown = min(1.0, needed, MAX_GROWTH * cap / max(height, width))
            if grown > scale:
                scale = grown
                reason += (
                    f"; grown so that the 5th-percentile object ({smallest:.0f} px) keeps "
                    f"{smallest * scale**2:.0f} px"
                )
        reason += f"; 5th-percentile object {smallest * scale**2:.0f} px at this size"
    size = [_round_side(height * scale), _round_side(width * scale)]
    image = Choice("data.image_size", size, reason)
    side = min(size)
    if size[0] == size[1]:
        crop_size = [size[0], size[1]]
        crop_reason = "square images: whole images"
    else:
        crop_size = [side, side]
        crop_reason = "random square crops of the shorter side; validation on whole images"
    return image, Choice("train.crop_size", crop_size, crop_reason)


def plan_choices(
    fingerprint: Mapping[str, Any],
    machine: Mapping[str, Any],
    step: Mapping[str, Any],
    sizes: tuple[Choice, Choice],
    hours: float,
    n_splits: int,
    submission_size: Sequence[int] | None,
) -> list[Choice]:
    """Every planned key, with its reason.

    Args:
        fingerprint: ``fingerprint.measure_fingerprint``'s result.
        machine: ``cores``, ``memory_available_gb``, ``gpu`` (name or None),
            ``gpu_memory_gb``, ``bf16`` (bool).
        step: the train step timed at the crop and at the planned batch (``plan_batch``):
            ``batch``, ``s_per_step`` (quiet wall), ``s_per_step_cpu``, ``s_first_step``,
            ``bytes_per_image``, ``backbone``.
        sizes: ``candidate_sizes``' choices.
        hours: the wall-time budget of the whole run.
        n_splits: the folds.
        submission_size: the submission's size, or None for each image's own size.
    """
    image, crop = sizes
    choices = [image, crop]
    n_images = int(fingerprint["images"]["count"])
    classes = fingerprint["classes"]
    gpu = bool(machine.get("gpu"))
    # Batch and accumulation, from the memory one image takes in a train step.
    per_image = max(float(step["bytes_per_image"]), 1.0)
    free, where = memory_for_batch(machine)
    fits = max(1, int(free // per_image))
    n_train = fold_training_images(n_images, n_splits)
    batch = int(step["batch"])
    accumulation = max(1, math.ceil(EFFECTIVE_BATCH / batch)) if batch < EFFECTIVE_BATCH else 1
    mb = per_image / 2**20
    choices.append(
        Choice(
            "train.batch_size",
            batch,
            f"measured {mb:.0f} MB per image at the crop; {fits} fit in {where}; "
            f"capped at {EFFECTIVE_BATCH} and a quarter of a fold's {n_train} training images",
        )
    )
    choices.append(
        Choice(
            "train.accumulation_steps",
            accumulation,
            f"{batch} x {accumulation} = {batch * accumulation} images per optimizer step "
            f"(the recipe's {EFFECTIVE_BATCH})",
        )
    )
    parallel = parallel_folds(machine, crop.value)
    choices.append(
        Choice(
            "train.parallel_folds",
            parallel,
            "small crops on a CPU: two fold processes use the cores better"
            if parallel > 1
            else "one fold at a time",
        )
    )
    empty = float(fingerprint["empty_pair_share"])
    with_classifier = empty >= EMPTY_SHARE_FOR_CLASSIFIER
    epochs, budget_reason = plan_epochs(
        step, machine, n_train, n_splits, parallel, hours, with_classifier
    )
    choices.append(Choice("train.epochs", epochs, budget_reason))
    # Folds.
    presence = [float(c["presence"]) for c in classes.values()]
    uneven = max(presence) - min(presence) > UNEVEN_PRESENCE or any(
        0 < p < 1 - UNEVEN_PRESENCE for p in presence
    )
    choices.append(Choice("folds.n_splits", n_splits, f"{n_splits} folds (--folds)"))
    choices.append(
        Choice(
            "folds.method",
            "multilabel_stratified" if uneven else "kfold",
            f"class presence {min(presence):.2f}..{max(presence):.2f}: "
            + ("uneven, so folds are stratified by it" if uneven else "even, plain k-fold"),
        )
    )
    # Classifier.
    gates = ["none", "classifier", "segmentation"] if with_classifier else ["none", "segmentation"]
    choices.append(
        Choice(
            "postprocess.gates",
            gates,
            f"{empty:.0%} of image-class pairs are empty: "
            + (
                f"a presence classifier pays (>= {EMPTY_SHARE_FOR_CLASSIFIER:.0%})"
                if with_classifier
                else f"under {EMPTY_SHARE_FOR_CLASSIFIER:.0%}, no classifier is trained"
            ),
        )
    )
    if with_classifier:
        choices.append(
            Choice("classifier.image_size", image.value, "the segmentation's training size")
        )
        choices.append(
            Choice(
                "classifier.epochs",
                max(MIN_EPOCHS, epochs * 2 // 3),
                "2/3 of the segmentation's: from scratch at lr 0.001 a resnet18 learns "
                "presence sooner than the U-Net learns masks",
            )
        )
        choices.append(Choice("classifier.batch_size", batch, "the segmentation's batch"))
        choices.append(
            Choice(
                "classifier.pooling",
                "avgmax",
                "average and max pooled: max still fires on small regions (docs/training.md)",
            )
        )
        choices.append(
            Choice(
                "classifier.multiscale_pooling",
                True,
                "pooled from all five stages: OOF AUC 0.95-0.98 against 0.88-0.97 on the demo",
            )
        )
        choices.append(Choice("classifier.weights", None, "no download assumed"))
        choices.append(
            Choice("classifier.lr", 0.001, "from scratch: higher than the pretrained default 3e-4")
        )
        choices.append(
            Choice("classifier.backbone", "resnet18", "learns presence from scratch quickly")
        )
    # Post-processing candidates from object sizes at the submission size.
    area_scale = _area_scale(fingerprint, submission_size)
    p5 = [c["area_p5"] for c in classes.values() if c["area_p5"] is not None]
    p50 = [c["area_p50"] for c in classes.values() if c["area_p50"] is not None]
    if p5 and p50:
        small, typical = min(p5) * area_scale, max(p50) * area_scale
        components = sorted({0, int(small / 2), int(small), int(typical / 4)})
        choices.append(
            Choice(
                "postprocess.min_components",
                components,
                f"objects at submission size: 5th percentile {small:.0f} px, median "
                f"{typical:.0f} px; 0, half and all of the 5th, a quarter of the median",
            )
        )
        top = max(typical * 4, 10)
        areas = sorted({0, *[int(v) for v in _geometric(max(small / 2, 1), top, 9)]})
        choices.append(
            Choice(
                "postprocess.min_areas",
                areas,
                f"0, then 9 steps from half the 5th-percentile object to 4x the median "
                f"({top:.0f} px)",
            )
        )
    # Loss and activation.
    fractions = [
        c["area_fraction_p50"] for c in classes.values() if c["area_fraction_p50"] is not None
    ]
    small_objects = bool(fractions) and min(fractions) < SMALL_OBJECT_FRACTION
    overlap = float(fingerprint["overlap_share"])
    overlapping = fingerprint.get("overlapping_images")
    exclusive = overlapping == 0 and len(classes) > 1
    if not exclusive:
        choices.append(
            Choice(
                "train.loss",
                "bce_dice" if small_objects else "bce_jaccard",
                (
                    f"median objects under {SMALL_OBJECT_FRACTION:.0%} of the image: dice keeps "
                    "small objects' weight"
                    if small_objects
                    else "objects of several % of the image: BCE + Jaccard, the demo's loss"
                ),
            )
        )
    if exclusive:
        choices.append(
            Choice(
                "model.activation",
                "softmax",
                f"no pixel of any of the {n_images} images is in two classes: one softmax "
                "over the classes and a background (cross-entropy + Dice; train.loss unused)",
            )
        )
    else:
        choices.append(
            Choice(
                "model.activation",
                "sigmoid",
                "one class: an independent sigmoid"
                if len(classes) == 1
                else f"classes overlap in {overlapping if overlapping is not None else '?'} "
                f"images ({overlap:.0%} of the sampled): independent sigmoids",
            )
        )
    choices.append(
        Choice(
            "augment",
            flips_augment(),
            "flips only: the recipe's Affine +-45 deg cost 0.02-0.03 OOF Dice in short runs "
            "on the demo (3 seeds) and the street scenes (docs/quality.md)",
        )
    )
    # Network and short-run settings.
    choices.append(
        Choice(
            "model.backbone",
            step["backbone"],
            "timed above; " + ("the recipe's on a GPU" if gpu else "the cheapest on a CPU"),
        )
    )
    choices.append(
        Choice("model.encoder_weights", None, "no download assumed; imagenet where available")
    )
    steps_total = epochs * batches_per_pass(n_train, batch * accumulation)
    if steps_total < 3000:
        choices.append(
            Choice(
                "model.bn_momentum",
                0.9,
                f"about {steps_total} optimizer steps per fold: BatchNorm statistics must keep up",
            )
        )
    choices.append(
        Choice(
            "train.lr",
            0.002 if batch * accumulation >= EFFECTIVE_BATCH else 0.001,
            "from scratch (no pretrained encoder): a higher rate than the recipe's 3e-4",
        )
    )
    choices.append(
        Choice(
            "predict.precision",
            "auto",
            "this CPU computes bfloat16 natively: auto picks it"
            if machine.get("bf16")
            else "no native bfloat16 here: auto keeps float32 (float16 on a tensor-core GPU)",
        )
    )
    return choices


def _area_scale(fingerprint: Mapping[str, Any], submission_size: Sequence[int] | None) -> float:
    if submission_size is None:
        return 1.0
    images = fingerprint["images"]
    return (submission_size[0] * submission_size[1]) / (
        float(images["height_p50"]) * float(images["width_p50"])
    )


def _geometric(low: float, high: float, n: int) -> list[float]:
    if high <= low:
        return [low]
    ratio = (high / low) ** (1 / (n - 1))
    return [low * ratio**i for i in range(n)]


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_config(
    choices: Sequence[Choice], fixed: Mapping[str, Any], header: Sequence[str]
) -> str:
    """The config file: ``header`` comment lines, then ``fixed`` keys (base, experiment,
    data paths) and the chosen ones by section, each with its reason as a comment.
    ``Choice``s whose key ends in ``_note`` are comments only (no key of the schema)."""
    lines = [f"# {line}" if line else "#" for line in header]
    sections: dict[str, list[str]] = {}
    top: list[str] = []
    for key, value in fixed.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, []).append(f"  {name}: {_flow(value)}")
        else:
            top.append(f"{key}: {_flow(value)}")
    for choice in choices:
        if "." not in choice.key:
            top.append(f"{choice.key}: {_flow(choice.value)}  # {choice.reason}")
            continue
        section, name = choice.key.split(".", 1)
        if name.endswith("_note"):
            sections.setdefault(section, []).append(
                f"  # {name.removesuffix('_note')}: {choice.value} ({choice.reason})"
            )
            continue
        sections.setdefault(section, []).append(
            f"  {name}: {_flow(choice.value)}  # {choice.reason}"
        )
    lines += top
    for section, entries in sections.items():
        lines += ["", f"{section}:", *entries]
    return "\n".join(lines) + "\n"

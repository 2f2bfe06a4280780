"""What each configuration key accepts beyond its default's type: the tables that
``core.config`` checks every value against (pure layer).

Choices owned by a pure module are taken from it; those of the Keras layer (which this
pure module cannot import) are checked against it by tests/unit/nn/test_choices.py.
"""

from __future__ import annotations

from pipeline.core.folds import FOLD_METHODS
from pipeline.core.postprocess import AT_LEAST_ONE_CHOICES, GATES
from pipeline.core.precision import PRECISIONS
from pipeline.core.tta import MERGES

# The Keras layers pipeline.nn.keras_backend can run on (config key ``framework``).
FRAMEWORKS: tuple[str, ...] = ("tf_keras", "keras3")

# Keys whose value may be null as well as the type of their default.
NULLABLE: frozenset[str] = frozenset(
    {
        "data.sample_submission",
        "data.test_truth",
        "data.classes",
        "data.submission_size",
        "data.cache_dir",
        "data.max_images",
        "model.encoder_weights",
        "model.bn_momentum",
        "model.decoder_filters",
        "classifier.weights",
        "train.val_crop",
        "train.steps_per_epoch",
        "train.ema_decay",
        "data.pseudo_labels",
        "data.pseudo_images",
        "jobs.address",
        "jobs.cpus_per_job",
    }
)

# Keys whose default is null: the type (and lower bound) a value other than null must have.
NULL_DEFAULT_TYPES: dict[str, tuple[type, float | None]] = {
    "jobs.address": (str, None),
    "jobs.cpus_per_job": (float, 0.0),
    "train.ema_decay": (float, 0.0),
    "data.pseudo_labels": (str, None),
    "data.pseudo_images": (str, None),
}
# Number keys that must lie below 1 (with their lower bound from the other tables).
BELOW_ONE_KEYS: frozenset[str] = frozenset({"train.ema_decay"})

# Choices owned by a pure module are taken from it; those of the Keras layer (which this
# pure module cannot import) are checked against it by tests/unit/nn/test_choices.py.
CHOICES: dict[str, tuple[str, ...]] = {
    "framework": FRAMEWORKS,
    "data.layout": ("auto", "image_label", "image_class", "imageid_classid", "instances"),
    "folds.method": tuple(sorted(FOLD_METHODS)),
    "model.architecture": ("Unet", "FPN", "Linknet", "PSPNet"),
    "model.decoder_block_type": ("upsampling", "transpose"),
    "train.loss": ("jaccard", "dice", "bce_jaccard", "bce_dice", "focal_dice", "lovasz"),
    "train.monitor_mode": ("min", "max"),
    "train.strategy": ("auto", "one_device", "mirrored", "multi_worker"),
    "train.swa_select": ("best", "last"),
    "jobs.executor": ("local", "ray"),
    "predict.precision": PRECISIONS,
    "tta.merge": MERGES,
    "classifier.monitor_mode": ("min", "max"),
    "classifier.pooling": ("avg", "max", "avgmax"),
    "postprocess.at_least_one": AT_LEAST_ONE_CHOICES,
}

# List keys whose items are each one of these choices.
LIST_CHOICES: dict[str, tuple[str, ...]] = {"postprocess.gates": GATES}

# Float keys that also accept the word "auto".
FLOAT_OR_AUTO: frozenset[str] = frozenset({"train.lr"})

# Boolean keys that also accept these words.
BOOL_OR_CHOICE: dict[str, tuple[str, ...]] = {"train.mixed_precision": ("bfloat16",)}

# [H, W] pairs of positive integers.
SIZE_KEYS: frozenset[str] = frozenset(
    {
        "data.image_size",
        "data.submission_size",
        "train.crop_size",
        "train.val_crop",
        "classifier.image_size",
    }
)

# Lists of exactly N positive integers (their default is null).
INT_LIST_KEYS: dict[str, int] = {"model.decoder_filters": 5}

# Integer keys that must be at least 1.
POSITIVE_INT_KEYS: frozenset[str] = frozenset(
    {
        "train.parallel_folds",
        "train.batch_size",
        "train.accumulation_steps",
        "train.epochs",
        "train.num_parallel_calls",
        "train.prefetch",
        "tta.batch_size",
        "classifier.batch_size",
        "classifier.accumulation_steps",
        "classifier.epochs",
        "lr_find.steps",
    }
)
# Number keys that must be at least 0.
NON_NEGATIVE_KEYS: frozenset[str] = frozenset(
    {"jobs.gpus_per_job", "train.weight_decay", "train.swa_top", "model.classification_head_weight"}
)
# Number keys that must be above 0.
POSITIVE_KEYS: frozenset[str] = frozenset({"train.encoder_lr_factor"})
# Integer keys that must be at least 2 (a split needs two parts).
AT_LEAST_TWO_KEYS: frozenset[str] = frozenset({"folds.n_splits"})

# Keys holding a list of {name: str, params: mapping} transform specs.
TRANSFORM_LIST_KEYS: frozenset[str] = frozenset({"augment"})

# Keys holding a list of {epoch: int, fraction: float, lr: float | null} stages.
SCHEDULE_KEYS: frozenset[str] = frozenset({"model.unfreeze_schedule"})

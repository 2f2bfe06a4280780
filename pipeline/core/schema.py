"""Every configuration key, declared once: its type, bounds, choices, default and meaning.

One frozen pydantic model per section, unknown keys forbidden. The defaults are the
reference recipe (the 48th-place Understanding Clouds solution); ``configs/default.yaml``
and ``docs/config.md`` are generated from this module (``python -m
pipeline.core.config_docs``). Choices owned by a pure module are its ``Literal`` types;
those of the Keras layer, which this pure module cannot import, are declared here and
checked against their owners by tests/unit/nn/test_choices.py. Loading, overrides and
error messages: ``core.config``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types as at
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from pipeline.core.config_types import (
    Bool,
    Expect,
    Float,
    Int,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Size,
    Str,
    unwrap,
)
from pipeline.core.folds import FoldMethod
from pipeline.core.formats import CsvFormat
from pipeline.core.mask_folder import MaskFormat
from pipeline.core.postprocess import AtLeastOne, Gate
from pipeline.core.precision import Engine, Precision
from pipeline.core.tta import Merge

# The Keras layers pipeline.nn.keras_backend can run on.
Framework = Literal["tf_keras", "keras3"]
FRAMEWORKS: tuple[str, ...] = get_args(Framework)
# Choices of the Keras layer (checked against their owners by tests/unit/nn/test_choices.py).
Architecture = Literal["Unet", "FPN", "Linknet", "PSPNet"]
DecoderBlockType = Literal["upsampling", "transpose"]
Activation = Literal["sigmoid", "softmax"]
Loss = Literal["jaccard", "dice", "bce_jaccard", "bce_dice", "focal_dice", "lovasz"]
Strategy = Literal["auto", "one_device", "mirrored", "multi_worker"]
Pooling = Literal["avg", "max", "avgmax"]
MonitorMode = Literal["min", "max"]
SwaSelect = Literal["best", "last"]
Executor = Literal["local", "ray"]
TrackingBackend = Literal["none", "mlflow"]

# Keys renamed since run directories were first written: old dotted key -> new one.
# Saved run configs are migrated silently; a user config naming an old key is refused
# with the new name.
RENAMED_KEYS: dict[str, str] = {"data.layout": "data.csv_format"}


def _name_from_int(value: object) -> object:
    """Severstal's classes are numbers: the integer 1 names the class "1"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


ClassName = Annotated[Str, BeforeValidator(_name_from_int), at.MinLen(1)]


def _fill_missing(**defaults: object) -> BeforeValidator:
    """Fill absent or null entries of a mapping with ``defaults`` before validation."""

    def fill(value: object) -> object:
        if not isinstance(value, dict):
            return value
        return {**value, **{k: v for k, v in defaults.items() if value.get(k) is None}}

    return BeforeValidator(fill)


@with_config(ConfigDict(extra="forbid"))
class TransformSpec(TypedDict):
    """One albumentations transform of ``augment``."""

    name: Annotated[Str, Field(description="the albumentations transform's class name")]
    params: Annotated[
        dict[str, JsonValue], Field(description="its keyword arguments (absent or null: none)")
    ]


@with_config(ConfigDict(extra="forbid"))
class UnfreezeStage(TypedDict):
    """One stage of ``model.unfreeze_schedule``."""

    epoch: Annotated[NonNegativeInt, Field(description="the epoch (from 0) the stage starts at")]
    fraction: Annotated[
        Float, at.Gt(0), at.Le(1), Field(description="the top fraction of the encoder that trains")
    ]
    lr: Annotated[
        PositiveFloat | None,
        Field(description="the learning rate from then on; absent or null keeps the current one"),
    ]


@with_config(ConfigDict(extra="forbid"))
class EnsembleMember(TypedDict):
    """One ``ensemble.members`` entry given with overrides."""

    config: Annotated[Str, Field(description="the member's config file")]
    set: Annotated[
        list[Str], Field(description="its --set overrides, KEY=VALUE each (absent: none)")
    ]


def _increasing_epochs(stages: list[UnfreezeStage]) -> list[UnfreezeStage]:
    for i in range(1, len(stages)):
        if stages[i]["epoch"] <= stages[i - 1]["epoch"]:
            raise ValueError(
                f"each stage's epoch must increase; stage [{i}] starts at epoch "
                f"{stages[i]['epoch']}, after stage [{i - 1}] at {stages[i - 1]['epoch']}"
            )
    return stages


class Section(BaseModel):
    """A config section: frozen, unknown keys forbidden, strict types."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def to_dict(self) -> dict[str, Any]:
        """The section as a plain dict (lists and mappings), as YAML and JSON hold it."""
        return self.model_dump(mode="python")


class DataConfig(Section):
    """Where the data set is and how it is read and sized."""

    demo: Bool = Field(
        False,
        description="true: the data set is the embedded demo, written by foldseg run into "
        "the folder of train_csv where missing",
    )
    train_csv: Str | None = Field(
        "data/clouds/train.csv",
        description="the training mask CSV; null when the masks are a folder (data.masks)",
    )
    masks: Str | None = Field(
        None,
        description="a folder of mask images instead of train_csv (set train_csv to null); "
        "see mask_format",
    )
    mask_format: Literal["auto", MaskFormat] = Field(
        "auto",
        description="the mask folder's format: binary (<image>.png, one class), per_class "
        "(<image>_<class>.png), indexed (value = class id), palette (colour = class); auto "
        "detects it",
    )
    class_map: dict[ClassName, Annotated[Int, at.Ge(1)]] | None = Field(
        None,
        description="indexed masks: class name -> pixel value (0 is background); null: "
        "classes[i] is i + 1, or each value found names its class",
    )
    palette: (
        dict[
            ClassName,
            Annotated[
                list[Annotated[Int, at.Ge(0), at.Le(255)]],
                at.Len(3, 3),
                Expect("[R, G, B] in 0..255", "list of 3 integers", "exactly 3; each 0..255"),
            ],
        ]
        | None
    ) = Field(None, description="palette masks: class name -> [R, G, B] (black is background)")
    ignore_index: NonNegativeInt | None = Field(
        None, description="indexed masks: the value of void pixels (e.g. 255); null: none"
    )
    ignore_color: (
        Annotated[
            list[Annotated[Int, at.Ge(0), at.Le(255)]],
            at.Len(3, 3),
            Expect("[R, G, B] in 0..255", "list of 3 integers", "exactly 3; each 0..255"),
        ]
        | None
    ) = Field(None, description="palette masks: the colour of void pixels; null: none")
    train_images: Str = Field(
        "data/clouds/train_images",
        description="the training image folder: the data set is every image in it",
    )
    test_images: Str = Field("data/clouds/test_images", description="the test image folder")
    sample_submission: Str | None = Field(
        "data/clouds/sample_submission.csv",
        description="the competition's sample submission, which lists the test images; null: "
        "every image in data.test_images",
    )
    test_truth: Str | None = Field(
        None,
        description="a truth CSV for the test images, when one exists: predict scores against it",
    )
    csv_format: Literal["auto", CsvFormat] = Field(
        "auto", description="the mask CSV's format (its columns); auto detects it from the header"
    )
    classes: (
        Annotated[
            list[ClassName], Expect("a list of class names (strings or integers)", "list of names")
        ]
        | None
    ) = Field(None, description="ordered class names; null: as found in the CSV")
    instance_class: Str = Field(
        "object", description="the class name of the instances format (one class)"
    )
    image_size: Size = Field(
        [384, 576], description="every image is resized to this, once, and cached"
    )
    submission_size: Size | None = Field(
        [350, 525], description="the size of submitted masks; null: each image's own size"
    )
    cache_dir: Str | None = Field(
        None, description="where resized images are cached; null: runs/<experiment>/cache"
    )
    max_images: PositiveInt | None = Field(
        None, description="use only the first N training images (quick runs); null: all"
    )
    pseudo_labels: Str | None = Field(
        None,
        description="a pseudo-label table (python -m pipeline.pseudo_label): its images join "
        "every fold's training part, never a validation part or the OOF",
    )
    pseudo_images: Str | None = Field(
        None, description="the folder of the pseudo-labelled images; null: data.test_images"
    )

    @model_validator(mode="after")
    def _one_mask_source(self) -> DataConfig:
        if (self.train_csv is None) == (self.masks is None):
            given = "both" if self.masks is not None else "neither"
            raise ValueError(
                f"give exactly one of data.train_csv and data.masks; got {given} (with "
                "data.masks, set data.train_csv to null)"
            )
        if self.ignore_index is not None and self.class_map is not None:
            for name, value in self.class_map.items():
                if value == self.ignore_index:
                    raise ValueError(
                        f"data.ignore_index {self.ignore_index} is also the value of class "
                        f"{name!r} in data.class_map; void pixels need a value of their own"
                    )
        return self


class FoldsConfig(Section):
    """The cross-validation split, made once per experiment."""

    n_splits: Annotated[Int, at.Ge(2)] = Field(3, description="the number of folds")
    method: FoldMethod = Field(
        "kfold", description="kfold (the recipe) or multilabel_stratified (by class presence)"
    )


class ModelConfig(Section):
    """The segmentation network."""

    architecture: Architecture = Field("Unet", description="the segmentation-models decoder")
    backbone: Str = Field("efficientnetb2", description="the segmentation-models encoder")
    encoder_weights: Str | None = Field(
        "imagenet",
        description="the encoder's initial weights: imagenet, a local weights file, "
        "or null (random)",
    )
    encoder_freeze_epochs: NonNegativeInt = Field(
        0, description="train the decoder only for the first N epochs"
    )
    unfreeze_schedule: Annotated[
        list[Annotated[UnfreezeStage, _fill_missing(lr=None)]],
        AfterValidator(_increasing_epochs),
        Expect(
            "a list of stages {epoch: integer >= 0, fraction: number > 0 and <= 1, "
            "lr: number > 0 or null}, epochs increasing",
            "list of stages",
            "epochs increasing",
        ),
    ] = Field(
        [],
        description="progressive unfreezing: from each stage's epoch on, the top fraction "
        "of the encoder trains, at its lr; e.g. [{epoch: 2, fraction: 0.5, lr: 0.0003}]",
    )
    decoder_block_type: DecoderBlockType = Field(
        "upsampling", description="Unet only: the decoder's upsampling block"
    )
    activation: Activation = Field(
        "sigmoid",
        description="sigmoid: independent classes (the recipe); softmax: mutually exclusive "
        "classes, C+1 channels (0 = background), cross-entropy + Dice, argmax masks",
    )
    decoder_filters: (
        Annotated[
            list[PositiveInt],
            at.Len(5, 5),
            Expect("5 positive integers", "list of integers", "exactly 5; each > 0"),
        ]
        | None
    ) = Field(
        None,
        description="Unet/Linknet: 5 decoder widths, deep to shallow; null: the "
        "architecture's (Unet: 256, 128, 64, 32, 16)",
    )
    bn_momentum: Annotated[Float, at.Ge(0), at.Lt(1)] | None = Field(
        None,
        description="BatchNorm moving-average momentum; null: the backbone's (0.99). Runs "
        "of a few hundred steps need about 0.9, or validation lags",
    )
    classification_head: Bool = Field(
        False,
        description="an auxiliary presence head on the encoder's deepest features (pool, "
        "dense, sigmoid per class); its OOF presence gates masks when no classifier is trained",
    )
    classification_head_weight: NonNegativeFloat = Field(
        0.1, description="the head's binary cross-entropy weight beside the mask loss"
    )


# The training settings the segmenter and the classifier share: declared once, each
# with its type, bounds and meaning; a section may give one its own default.
BatchSize = Annotated[PositiveInt, Field(description="images per batch")]
AccumulationSteps = Annotated[
    PositiveInt, Field(description="batches whose gradients are summed per optimizer step")
]
Epochs = Annotated[
    PositiveInt, Field(description="the most epochs (early stopping may end sooner)")
]
Monitor = Annotated[
    Str,
    Field(
        description="the validation metric the schedule, early stopping and the best weights follow"
    ),
]


class FitConfig(Section):
    """Training settings shared by the segmenter (``train``) and the classifier."""

    batch_size: BatchSize = 16
    accumulation_steps: AccumulationSteps = 8
    epochs: Epochs = 50
    monitor: Monitor = "val_dice"
    monitor_mode: MonitorMode = Field("max", description="max: a higher monitor is better")
    reduce_lr_factor: Annotated[Float, at.Gt(0), at.Lt(1)] = Field(
        0.5, description="ReduceLROnPlateau: the learning rate is multiplied by this"
    )
    reduce_lr_patience: NonNegativeInt = Field(
        2, description="ReduceLROnPlateau: epochs without improvement before it"
    )
    min_lr: NonNegativeFloat = Field(1e-6, description="ReduceLROnPlateau's floor")
    early_stopping_patience: NonNegativeInt = Field(
        5, description="epochs without improvement before training stops"
    )


class TrainConfig(FitConfig):
    """How the segmentation folds train."""

    lr: PositiveFloat | Literal["auto"] = Field(
        1e-3,
        description="Adam's learning rate, or auto: the LR finder's suggestion "
        "(python -m pipeline.lr_find)",
    )
    crop_size: Size = Field(
        [352, 544], description="random training crops of the resized images; sides divisible by 32"
    )
    val_crop: Size | None = Field(
        None, description="validation on a centre crop of this size; null: the whole image"
    )
    encoder_lr_factor: PositiveFloat = Field(
        1.0, description="the encoder trains at lr x this (Clouds 1st place: 0.1)"
    )
    weight_decay: NonNegativeFloat = Field(
        0.0, description="above 0: AdamW's decoupled decay, once per applied step"
    )
    ema_decay: Annotated[Float, at.Gt(0), at.Lt(1)] | None = Field(
        None,
        description="e.g. 0.99: validation, the best weights and the OOF use an exponential "
        "moving average of the weights; null: off",
    )
    swa_top: NonNegativeInt = Field(
        0,
        description="N >= 2: the weights of N epochs (swa_select) are averaged when training "
        "ends, BatchNorm re-estimated, and the OOF uses the average; 0 or 1: off",
    )
    swa_select: SwaSelect = Field(
        "best",
        description="which epochs swa_top averages: the N best by the monitor, or the N last",
    )
    loss: Loss = Field("jaccard", description="the segmentation loss")
    metric_threshold: Probability = Field(
        0.5, description="the pixel threshold of the training metrics (Dice, Kaggle Dice)"
    )
    metric_min_area: NonNegativeInt = Field(
        0, description="the training metrics count a predicted mask under N pixels as empty"
    )
    strategy: Strategy = Field(
        "auto",
        description="the tf.distribute strategy; auto: mirrored over the GPUs when there are "
        "several, else TensorFlow's default",
    )
    mixed_precision: Bool | Literal["bfloat16"] = Field(
        False,
        description="true: mixed_float16 on a GPU (ignored on a CPU); bfloat16: "
        "mixed_bfloat16 anywhere (CPUs with AVX512-BF16 or AMX, recent GPUs)",
    )
    bn_recalibration: Bool = Field(
        False,
        description="after training, re-estimate the best weights' BatchNorm statistics on "
        "the training fold (best_<monitor> is from before it)",
    )
    tensorboard: Bool = Field(False, description="write TensorBoard logs into the fold")
    steps_per_epoch: PositiveInt | None = Field(
        None, description="batches per epoch; null: one pass over the training fold"
    )
    num_parallel_calls: PositiveInt = Field(2, description="parallel image loads (tf.data map)")
    prefetch: PositiveInt = Field(2, description="batches prepared ahead (tf.data prefetch)")
    verbose: Annotated[Int, at.Ge(0), at.Le(2)] = Field(
        1, description="Keras progress output: 0 silent, 1 a bar, 2 one line per epoch"
    )
    parallel_folds: PositiveInt = Field(
        1,
        description="--all and the demo: fold processes at once, each on cores/N threads "
        "(keep 1 on one GPU)",
    )


class JobsConfig(Section):
    """Where fold jobs run (--all, the demo, grid): see docs/scale.md."""

    executor: Executor = Field(
        "local",
        description="local: child processes here (train.parallel_folds at once); ray: one "
        "Ray task per fold",
    )
    address: Str | None = Field(
        None,
        description='ray: an existing cluster ("auto", "ray://host:10001"); null starts a '
        "local Ray instance with this machine's cores",
    )
    cpus_per_job: PositiveFloat | None = Field(
        None,
        description="ray: CPUs (and TensorFlow threads) per fold job; null: this machine's "
        "cores / train.parallel_folds",
    )
    gpus_per_job: NonNegativeFloat = Field(
        0.0, description="ray: GPUs per fold job, may be a fraction"
    )


class TtaConfig(Section):
    """Test-time augmentation of every prediction (OOF, test, classifier)."""

    views: list[Str] = Field(
        ["identity", "hflip", "vflip", "hvflip"],
        description="the views predicted and merged: identity, hflip, vflip, hvflip, rot90, "
        "rot180, rot270, transpose, shift:<dy>,<dx>",
    )
    merge: Merge = Field("mean", description="how views and folds are merged")
    batch_size: PositiveInt = Field(8, description="images per prediction batch")


class PredictConfig(Section):
    """Inference arithmetic and runtime."""

    precision: Precision = Field(
        "auto",
        description="auto: bfloat16 on a CPU with AMX-BF16 or AVX512-BF16, float16 on a GPU "
        "with tensor cores, else float32 (weights and outputs stay float32)",
    )
    engine: Engine = Field(
        "auto",
        description="the runtime of the networks: openvino or onnxruntime (each fold converted "
        "once, cached in the run), tensorflow, or auto: tensorflow (no conversion to pay "
        "for; docs/deploy.md)",
    )


class ClassifierConfig(FitConfig):
    """The presence classifier (image -> per-class probability) that gates the masks."""

    backbone: Str = Field(
        "efficientnetb0",
        description="any segmentation-models backbone (efficientnetb0..b7, resnet*, "
        "seresnet*, resnext*, inceptionv3, ...) or xception",
    )
    weights: Str | None = Field(
        "imagenet",
        description="the backbone's initial weights: imagenet, a local weights file, or "
        "null (random)",
    )
    image_size: Size = Field([384, 576], description="the classifier's input size")
    init_from_segmentation: Bool = Field(
        False,
        description="start the backbone from the same fold's segmentation encoder (needs "
        "classifier.backbone == model.backbone and that fold trained)",
    )
    pooling: Pooling = Field(
        "avg",
        description="global pooling of the features; avgmax concatenates both (max still "
        "fires on small regions)",
    )
    multiscale_pooling: Bool = Field(
        False,
        description="pool every encoder stage (strides 2..32), not only the last, and concatenate",
    )
    dropout: Annotated[Float, at.Ge(0), at.Lt(1)] = Field(
        0.3, description="dropout before the output layer"
    )
    accumulation_steps: AccumulationSteps = 1
    lr: PositiveFloat = Field(3e-4, description="Adam's learning rate")
    epochs: Epochs = 30
    label_smoothing: Annotated[Float, at.Ge(0), at.Lt(1)] = Field(
        0.0, description="binary label smoothing of the presence targets"
    )
    monitor: Monitor = "val_auc"


# The recipe's pixel thresholds: steps of 0.05, then 0.975.
_RECIPE_THRESHOLDS = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
    0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975,
]  # fmt: skip


class PostprocessConfig(Section):
    """The post-processing grid tune searches on the out-of-fold predictions."""

    thresholds: Annotated[list[Probability], at.MinLen(1)] = Field(
        _RECIPE_THRESHOLDS,
        description="pixel probability thresholds searched per class",
    )
    min_areas: Annotated[list[NonNegativeInt], at.MinLen(1)] = Field(
        [0, 5000, 10000, 15000, 20000, 25000, 30000, 35000, 40000, 45000],
        description="minimum mask areas searched per class, in pixels at submission size",
    )
    min_components: Annotated[list[NonNegativeInt], at.MinLen(1)] = Field(
        [0],
        description="8-connected components under N pixels are removed, searched (e.g. "
        "[0, 150, 600]; 0: none); sizes above 1 label every image per class and threshold",
    )
    gate_thresholds: Annotated[list[Probability], at.MinLen(1)] = Field(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
        description="presence thresholds searched for the gates: a mask is blanked under one",
    )
    gates: Annotated[list[Gate], at.MinLen(1)] = Field(
        ["none", "classifier", "segmentation"],
        description="presence gates searched: the classifier's probability, the top-k mean "
        "of the mask's pixels (segmentation), or their mean (fused)",
    )
    topk_fraction: Annotated[Float, at.Gt(0), at.Le(1)] = Field(
        0.01, description="the segmentation gate: mean of this top fraction of pixel probabilities"
    )
    at_least_one: AtLeastOne = Field(
        "never",
        description="an image left with no mask keeps the class with the highest top-1% mean "
        "(Clouds 1st place): never, always, auto (if every training image has a class) or "
        "search (if it raises the tuned OOF score)",
    )


class EnsembleConfig(Section):
    """python -m pipeline.ensemble: blend trained experiments."""

    members: list[
        Annotated[
            Str | Annotated[EnsembleMember, _fill_missing(set=[])],
            Expect(
                "a config path or {config: path, set: [KEY=VALUE, ...]}",
                "path or mapping",
                plural="config paths or {config: path, set: [KEY=VALUE, ...]} mappings",
            ),
        ]
    ] = Field(
        [],
        description="the member experiments: config paths, or {config: path, set: "
        "[KEY=VALUE, ...]}; they must share one split, classes and submission size",
    )
    weight_step: Annotated[Float, at.Gt(0), at.Le(1)] = Field(
        0.1,
        description="per-class blend weights are searched on this simplex grid, together "
        "with the postprocess grid",
    )


class PseudoLabelConfig(Section):
    """python -m pipeline.pseudo_label: confident test images as training data."""

    positive: Probability = Field(
        0.95,
        description="a class is present where its post-processed mask is non-empty and the "
        "classifier's probability is above this",
    )
    negative: Probability = Field(
        0.05,
        description="a class is absent where its mask is empty and the probability is below "
        "this; an image is kept when every class is one or the other",
    )


class LrFindConfig(Section):
    """The learning-rate range test (python -m pipeline.lr_find)."""

    start_lr: PositiveFloat = Field(1e-7, description="the first learning rate")
    end_lr: PositiveFloat = Field(1.0, description="the last learning rate")
    steps: PositiveInt = Field(200, description="batches, the lr growing exponentially")
    smoothing: Annotated[Float, at.Ge(0), at.Lt(1)] = Field(
        0.98, description="exponential smoothing of the loss"
    )
    diverge_factor: Annotated[Float, at.Gt(1)] = Field(
        4.0, description="stop once the smoothed loss exceeds this x its minimum"
    )


class EnergyConfig(Section):
    """The energy and CO2 estimate of training and prediction runs."""

    cpu_watts: NonNegativeFloat = Field(65.0, description="average CPU package draw while busy")
    gpu_watts: NonNegativeFloat = Field(300.0, description="average draw per GPU while busy")
    pue: NonNegativeFloat = Field(1.2, description="the data centre's power usage effectiveness")
    grid_g_co2_per_kwh: NonNegativeFloat = Field(400.0, description="the grid's carbon intensity")


class TrackingConfig(Section):
    """Experiment tracking: every stage logs to one MLflow run per experiment (docs/tracking.md)."""

    backend: TrackingBackend = Field(
        "none", description="none: no tracking (mlflow is never imported); mlflow: log to MLflow"
    )
    uri: Str | None = Field(
        None,
        description="the MLflow tracking URI (sqlite:///..., a folder, http://host:port); "
        "null: sqlite:///<runs_dir>/mlflow.db",
    )
    experiment: Str = Field(
        "foldseg",
        description="the MLflow experiment that holds the runs, one run per foldseg "
        "experiment (named after it), so that runs are compared side by side",
    )


def recipe_augment() -> list[TransformSpec]:
    """The recipe's training augmentation (augment's default): flips + Affine +-45 deg."""
    return [
        {"name": "HorizontalFlip", "params": {"p": 0.5}},
        {"name": "VerticalFlip", "params": {"p": 0.5}},
        {
            "name": "Affine",
            "params": {
                "translate_percent": [-0.0625, 0.0625],
                "scale": [0.9, 1.1],
                "rotate": [-45, 45],
                "p": 0.5,
            },
        },
    ]


def flips_augment() -> list[TransformSpec]:
    """The recipe's augmentation without its Affine: horizontal and vertical flips."""
    return [t for t in recipe_augment() if t["name"] != "Affine"]


class RootConfig(Section):
    """One experiment's configuration: the top-level keys and every section."""

    experiment: Str = Field(
        "clouds_unet_effb2", description="the experiment's name: runs/<experiment>"
    )
    seed: NonNegativeInt = Field(
        12345, description="seeds the split, the training and the augmentation"
    )
    runs_dir: Str = Field("runs", description="where run directories are made")
    framework: Framework = Field(
        "tf_keras",
        description="tf_keras: Keras 2 + segmentation-models 1.0.1 (the recipe's); keras3: "
        "Keras 3 + segmodels-keras; folds trained with one are not loaded by the other",
    )
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    folds: FoldsConfig = Field(default_factory=FoldsConfig, description=FoldsConfig.__doc__)
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    jobs: JobsConfig = Field(default_factory=JobsConfig, description=JobsConfig.__doc__)
    augment: Annotated[
        list[Annotated[TransformSpec, _fill_missing(params={})]],
        Expect(
            "a list of transforms {name: <albumentations transform>, params: {...}}",
            "list of transforms",
        ),
    ] = Field(
        default_factory=recipe_augment,
        description="albumentations transforms applied to the training crops, in order",
    )
    tta: TtaConfig = Field(default_factory=TtaConfig, description=TtaConfig.__doc__)
    predict: PredictConfig = Field(default_factory=PredictConfig, description=PredictConfig.__doc__)
    classifier: ClassifierConfig = Field(
        default_factory=ClassifierConfig, description=ClassifierConfig.__doc__
    )
    postprocess: PostprocessConfig = Field(
        default_factory=PostprocessConfig, description=PostprocessConfig.__doc__
    )
    ensemble: EnsembleConfig = Field(
        default_factory=EnsembleConfig, description=EnsembleConfig.__doc__
    )
    pseudo_label: PseudoLabelConfig = Field(
        default_factory=PseudoLabelConfig, description=PseudoLabelConfig.__doc__
    )
    lr_find: LrFindConfig = Field(default_factory=LrFindConfig, description=LrFindConfig.__doc__)
    energy: EnergyConfig = Field(default_factory=EnergyConfig, description=EnergyConfig.__doc__)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description=TrackingConfig.__doc__
    )


def choices(dotted: str) -> tuple[object, ...]:
    """The choices of a ``Literal``-typed key, e.g. ``choices("train.loss")``."""
    model: type[BaseModel] = RootConfig
    *sections, name = dotted.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    annotation = unwrap(model.model_fields[name].annotation)[0]
    if get_origin(annotation) is not Literal:
        raise ValueError(f"config key {dotted!r} is not a choice; its type is {annotation!r}")
    return get_args(annotation)

"""The reference for the pipeline's network quality: a minimal, kernel-style Keras script.

What a Kaggle competitor writes in sixty lines: a ``keras.utils.Sequence`` that reads
each image with cv2 and resizes it (``cv2.resize``'s default bilinear), random flips,
``sm.Unet`` with a sigmoid head, ``sm.losses.JaccardLoss``, plain
``keras.optimizers.Adam``, and ReduceLROnPlateau / EarlyStopping / ModelCheckpoint on
the validation Dice (``sm.metrics.FScore``). It trains one fold of a pipeline
experiment (same images, masks, split and settings: ``data.image_size``,
``model.backbone``, ``model.bn_momentum``, ``train.batch_size``, ``lr``, ``epochs``,
``reduce_lr_*``, ``early_stopping_patience``, ``seed``) and predicts its validation images
with the experiment's flip views, scored like the pipeline's OOF: Kaggle Dice at 0.5
at the submission size.

Only the data reading (masks from the experiment's canonical table) and the scoring
(``pipeline.core.metrics.kaggle_dice``) are the pipeline's; the training is independent.
Used by ``benchmarks/bench_quality.py`` and by the regression test that keeps the
pipeline's network at least as good (tests/integration/test_quality.py).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.images import read_image_size
from pipeline.core.masks import decode_masks, resize_probs, truth_masks
from pipeline.core.metrics import kaggle_dice
from pipeline.nn.keras_backend import keras, sm, tf

INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
FLIPS = {"identity": (), "hflip": (2,), "vflip": (1,), "hvflip": (1, 2)}


class FoldSequence(keras.utils.Sequence):
    """Batches of (preprocessed image, mask) at ``size``, shuffled and flipped when training."""

    def __init__(
        self,
        paths: Sequence[Path],
        rles: Sequence[Sequence[str]],
        size: Sequence[int],
        preprocess: Any,
        batch_size: int,
        train: bool,
        seed: int,
        interpolation: str = "linear",
    ) -> None:
        super().__init__()
        self.interpolation = INTERPOLATIONS[interpolation]
        self.paths, self.rles, self.size = list(paths), list(rles), (int(size[0]), int(size[1]))
        self.preprocess, self.batch_size, self.train = preprocess, batch_size, train
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(self.paths))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raw = cv2.imread(str(self.paths[i]), cv2.IMREAD_COLOR)
        if raw is None:
            raise FileNotFoundError(f"cannot read image {self.paths[i]}")
        image = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
        mask = decode_masks(self.rles[i], image.shape[:2])
        height, width = self.size
        image = cv2.resize(image, (width, height), interpolation=self.interpolation)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return image, mask.reshape(height, width, -1)

    def __getitem__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        images, masks = zip(*(self.load(int(i)) for i in rows), strict=True)
        x, y = np.stack(images).astype(np.float32), np.stack(masks).astype(np.float32)
        if self.train:
            for k in range(len(x)):
                for axis in (1, 0):
                    if self.rng.random() < 0.5:
                        x[k], y[k] = np.flip(x[k], axis), np.flip(y[k], axis)
        return self.preprocess(x), y

    def on_epoch_end(self) -> None:
        if self.train:
            self.rng.shuffle(self.order)


def settings_from_config(
    config: Any, n_classes: int, interpolation: str = "linear"
) -> dict[str, Any]:
    """The script's settings equal to a pipeline experiment's (``train_fold``'s keys)."""
    t = config.train
    return {
        "size": list(config.data.image_size),
        "submission_size": config.data.submission_size,
        "backbone": config.model.backbone,
        "bn_momentum": config.model.bn_momentum,
        "n_classes": n_classes,
        "batch_size": t.batch_size,
        "lr": float(t.lr),
        "epochs": t.epochs,
        "reduce_lr_factor": t.reduce_lr_factor,
        "reduce_lr_patience": t.reduce_lr_patience,
        "min_lr": t.min_lr,
        "early_stopping_patience": t.early_stopping_patience,
        "views": list(config.tta.views),
        "seed": config.seed,
        "interpolation": interpolation,
        # The recipe's loss is the default; another one is named (sm's own function).
        **({"loss": t.loss} if t.loss != "jaccard" else {}),
    }


SM_LOSSES = {"jaccard": "JaccardLoss", "bce_jaccard": "bce_jaccard_loss", "dice": "DiceLoss"}


def make_loss(name: str) -> Any:
    """segmentation-models' own loss called ``name`` (as the pipeline's ``train.loss``)."""
    if name not in SM_LOSSES:
        raise ValueError(f"the minimal script supports losses {sorted(SM_LOSSES)}; got {name!r}")
    loss = getattr(sm.losses, SM_LOSSES[name])
    return loss() if isinstance(loss, type) else loss


def train_fold(
    paths: dict[str, Path],
    rles: dict[str, list[str]],
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Train one fold; OOF Kaggle Dice at 0.5 of ``val_ids``: ``per_image`` (N, C) per
    image and class, in ``val_ids`` order, the ``best_epoch`` the checkpoint kept and the
    Keras ``history`` (per epoch: loss, val_loss, the Dice and learning rate).

    ``settings``: size, submission_size (None: each image's own), backbone,
    bn_momentum (None: the backbone's), n_classes, batch_size, lr, epochs,
    reduce_lr_factor, reduce_lr_patience, min_lr, early_stopping_patience, views, seed,
    interpolation ("linear", cv2's default, or "area": the pipeline's cache), loss
    (``SM_LOSSES``; default jaccard).
    """
    s = settings
    keras.backend.clear_session()
    np.random.seed(s["seed"])
    tf.random.set_seed(s["seed"])
    preprocess = sm.get_preprocessing(s["backbone"])

    def sequence(ids: Sequence[str], train: bool) -> FoldSequence:
        return FoldSequence(
            [paths[i] for i in ids],
            [rles[i] for i in ids],
            s["size"],
            preprocess,
            s["batch_size"],
            train,
            s["seed"],
            s.get("interpolation", "linear"),
        )

    model = sm.Unet(
        s["backbone"], classes=s["n_classes"], activation="sigmoid", encoder_weights=None
    )
    if s["bn_momentum"] is not None:
        for layer in model.submodules:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = s["bn_momentum"]
    dice = sm.metrics.FScore(threshold=0.5)
    loss = make_loss(s.get("loss", "jaccard"))
    model.compile(keras.optimizers.Adam(s["lr"]), loss, metrics=[dice])
    monitor = f"val_{dice.name}"
    with tempfile.TemporaryDirectory() as tmp:
        best = str(Path(tmp) / "best.h5")
        history = model.fit(
            sequence(train_ids, True),
            validation_data=sequence(val_ids, False),
            epochs=s["epochs"],
            verbose=0,
            callbacks=[
                keras.callbacks.ReduceLROnPlateau(
                    monitor,
                    mode="max",
                    factor=s["reduce_lr_factor"],
                    patience=s["reduce_lr_patience"],
                    min_lr=s["min_lr"],
                ),
                keras.callbacks.EarlyStopping(
                    monitor, mode="max", patience=s["early_stopping_patience"]
                ),
                keras.callbacks.ModelCheckpoint(
                    best, monitor, mode="max", save_best_only=True, save_weights_only=True
                ),
            ],
        )
        model.load_weights(best)
    scores = []
    val = sequence(val_ids, False)
    for b in range(len(val)):
        x, _ = val[b]
        views = [np.flip(x, axes) if axes else x for axes in (FLIPS[v] for v in s["views"])]
        outs = [model.predict_on_batch(v) for v in views]
        prob = np.mean(
            [
                np.flip(o, FLIPS[v]) if FLIPS[v] else o
                for o, v in zip(outs, s["views"], strict=True)
            ],
            axis=0,
        )
        for k, p in enumerate(prob):
            image_id = val_ids[b * s["batch_size"] + k]
            original = read_image_size(paths[image_id])
            target = s["submission_size"] or original
            truth = truth_masks(rles[image_id], original, target)
            scores.append(kaggle_dice(truth[None], resize_probs(p, target)[None], 0.5)[0])
    monitored = history.history[monitor]
    return {
        "per_image": np.stack(scores),
        "best_epoch": int(np.argmax(monitored)) + 1,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }

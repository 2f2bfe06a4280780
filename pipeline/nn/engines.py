"""The Keras engines of prediction: one network built once, given each fold's weights in
turn (framework layer; ``run.predictor`` drives them).

``KerasSegmentation`` is the config's segmentation model, ``KerasPresence`` its presence
classifier; both are built without pretrained weights (every fold's weights replace all
layers) under the inference precision the caller has set (``devices.precision_policy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.config import Config
from pipeline.nn.classifier import build_classifier_from_config
from pipeline.nn.inference import accepts_swapped, predict_outputs_on_replicas
from pipeline.nn.keras_backend import keras
from pipeline.nn.model import build_model
from pipeline.nn.weights import load_best_weights


class _FoldWeights:
    """One model and the folds' weight files it is given in turn."""

    def __init__(self, model: keras.Model, weights: Sequence[Path]) -> None:
        if not weights:
            raise ValueError("an engine needs at least one fold's weights")
        self.model = model
        self.weights = list(weights)

    @property
    def n_folds(self) -> int:
        return len(self.weights)

    def use_fold(self, fold: int) -> None:
        """Load fold ``fold``'s weights into the model."""
        load_best_weights(self.model, self.weights[fold])

    def accepts(self, height: int, width: int) -> bool:
        """Whether the model runs (N, height, width, 3) inputs."""
        return accepts_swapped(self.model, width, height)


def build_prediction_model(config: Config, n_classes: int) -> keras.Model:
    """The segmentation model of ``config`` for prediction at ``data.image_size``."""
    fixed = config.data.image_size if config.model.architecture == "PSPNet" else None
    # The fold weights replace every layer, so no pretrained encoder is read.
    return build_model(config.with_overrides(["model.encoder_weights=null"]), n_classes, fixed)


def build_presence_model(config: Config, n_classes: int) -> keras.Model:
    """The presence classifier of ``config`` for prediction (no pretrained weights read)."""
    return build_classifier_from_config(
        config.with_overrides(["classifier.weights=null"]), n_classes
    )


class KerasSegmentation(_FoldWeights):
    """The segmentation model of ``config`` at ``data.image_size``, one fold at a time."""

    def __init__(self, config: Config, n_classes: int, weights: Sequence[Path]) -> None:
        super().__init__(build_prediction_model(config, n_classes), weights)

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(M, H, W, 3) float32 -> masks (M, H, W, C) and the presence head's (M, C) or None."""
        outputs = predict_outputs_on_replicas(self.model, batch)
        return outputs[0], outputs[1] if len(outputs) > 1 else None


class KerasPresence(_FoldWeights):
    """The presence classifier of ``config`` at ``classifier.image_size``."""

    def __init__(self, config: Config, n_classes: int, weights: Sequence[Path]) -> None:
        super().__init__(build_presence_model(config, n_classes), weights)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(M, H, W, 3) float32 -> presence probabilities (M, C) float32."""
        return predict_outputs_on_replicas(self.model, batch)[0]

"""The SavedModel engine: an exported bundle's SavedModel folds on a stock TensorFlow.

The one module outside ``pipeline.nn`` that may import TensorFlow, a named door
(tests/unit/test_pure_layer.py ``DOORS``): it imports it only when an engine is built,
so the bundle runner, which imports this module, stays TensorFlow-free for an OpenVINO
or ONNX bundle. It needs no Keras, segmentation-models or foldseg training code: the
SavedModel is a fixed ``tf.Module`` with one signature (``nn.export``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.run.runtime_engines import ExportedFolds


class SavedModelNetworks(ExportedFolds):
    """SavedModel folds on a stock TensorFlow (imported here, when built): a segmentation
    (``forward`` -> masks, presence or None) or a presence classifier (``presence`` True:
    ``forward`` -> (M, C))."""

    def __init__(
        self,
        folders: Sequence[Path],
        presence: bool = False,
        fixed_size: tuple[int, int] | None = None,
    ) -> None:
        import tensorflow as tf

        super().__init__(folders, presence, fixed_size)
        self._tf = tf
        self._loaded: Any = None
        self.fold = -1  # none loaded yet

    def use_fold(self, fold: int) -> None:
        if fold != self.fold:
            self._loaded = self._tf.saved_model.load(str(self.members[fold]))
            self.fold = fold

    def forward(self, batch: np.ndarray) -> Any:
        """(M, H, W, 3) float32 -> masks (M, H, W, C) and presence (M, C) or None; a
        presence classifier's (M, C)."""
        result = self._loaded.signatures["serving_default"](
            images=self._tf.constant(batch, self._tf.float32)
        )
        outputs = {key: value.numpy() for key, value in result.items()}
        if self.is_presence:
            return outputs["presence"]
        return outputs["masks"], outputs.get("presence")

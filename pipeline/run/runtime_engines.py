"""Engines that run exported networks (pure run layer: no TensorFlow at import).

Each implements ``run.predictor``'s ``SegmentationEngine`` (and ``PresenceEngine``) over
one file per fold, so ``pipeline.predict`` and the bundle runner drive them with the same
TTA, fold merge and post-processing code as the Keras engines:

- ``OnnxNetworks``: ONNX files (``.onnx``) on onnxruntime's CPU provider, one session per
  fold, float32 (onnxruntime has no bfloat16 CPU kernels for these graphs).
- ``OpenVinoNetworks``: OpenVINO IR (``.xml``/``.bin``). One compiled model per fold and
  input shape, the throughput hint, batches cut into requests of ``rows`` stacked images
  run by an ``AsyncInferQueue`` (the CPU's streams in parallel), computed in bfloat16 where
  the CPU does it natively (``core.precision``). Measured fastest in bfloat16 on a 2-core
  AMD EPYC with AVX512-BF16, and in float32 on a Xeon without it (docs/deploy.md).

The SavedModel engine lives in ``run.savedmodel_engine``, the one module outside
``pipeline.nn`` that imports TensorFlow (a named door: tests/unit/test_pure_layer.py).

``ENGINES`` names them; ``available_engines`` says which are installed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.precision import ENGINE_CHOICES

log = logging.getLogger(__name__)

OPENVINO = "openvino"
ONNXRUNTIME = "onnxruntime"
TENSORFLOW = "tensorflow"
# The engines a run may ask for.
ENGINES: tuple[str, ...] = tuple(e for e in ENGINE_CHOICES if e != "auto")
# ``auto``'s order by precision: fastest first, as measured (docs/deploy.md). bfloat16:
# OpenVINO (3.6x a kernel's forward on AVX512-BF16; onnxruntime has no bfloat16 kernels
# here). float32: the whole process decides for a bundle (below).
# A bundle's whole process (bench_deploy.py, B2 at 352x480, float32, records 73-74):
# OpenVINO 24.8-30.4 s, onnxruntime 30.0-31.2 s, TensorFlow 53 s (its import and
# loading outweigh its forward, which was level with onnxruntime's).
AUTO_ORDER = {
    "bfloat16": (OPENVINO, ONNXRUNTIME, TENSORFLOW),
    "float32": (OPENVINO, ONNXRUNTIME, TENSORFLOW),
}
# ``pipeline.predict`` converts each fold before OpenVINO or onnxruntime can run it, and
# that first conversion costs more than the faster forward saves on a run, in either
# precision: 3 EfficientNet-B0 folds in float32, 89.5 s converting against 11.6 s for the
# whole prediction on TensorFlow; 3 B2 folds at 352x480 in bfloat16 on AVX512-BF16
# (bench_deploy.py, records 81-82), 67-75 s for the converting run against 20-22 s on
# TensorFlow (15 s on OpenVINO once converted). So there TensorFlow comes first.
AUTO_ORDER_CONVERTING = (TENSORFLOW, OPENVINO, ONNXRUNTIME)
# The OpenVINO inference precision of each ``predict.precision``.
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# Rows (stacked images) per OpenVINO request: one image's four flips.
REQUEST_ROWS = 4
STRIDE = 32


def available_engines() -> list[str]:
    """The engines whose runtime is installed, in ``ENGINES``' order."""
    module = {OPENVINO: "openvino", ONNXRUNTIME: "onnxruntime", TENSORFLOW: "tensorflow"}
    return [name for name in ENGINES if importlib.util.find_spec(module[name]) is not None]


def choose_engine(
    requested: str,
    offered: Sequence[str] | None = None,
    precision: str = "bfloat16",
    converting: bool = False,
) -> str:
    """``requested`` unless it is ``auto``: then the first of ``AUTO_ORDER[precision]``
    (``AUTO_ORDER_CONVERTING`` when the networks must be ``converting`` first, as in
    ``pipeline.predict``; float16 as float32) among the engines installed and
    ``offered`` (default: all). ValueError when none is installed or it is unknown."""
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {list(ENGINE_CHOICES)}; got {requested!r}")
    installed = available_engines()
    candidates = [e for e in installed if offered is None or e in offered]
    if requested == "auto":
        if not candidates:
            raise ValueError(
                f"no engine installed for {list(offered or ENGINES)}: pip install openvino "
                "or onnxruntime (the runner's requirements.txt) or tensorflow"
            )
        order = (
            AUTO_ORDER_CONVERTING
            if converting
            else AUTO_ORDER.get(precision, AUTO_ORDER["float32"])
        )
        return next(e for e in order if e in candidates)
    if requested not in installed:
        raise ValueError(f"engine {requested!r} is not installed (pip install {requested})")
    return requested


def exported_precision(engine: str, precision: str) -> str:
    """The precision an exported float32 network computes in on ``engine`` when
    ``precision`` is asked: OpenVINO's own (it converts as it compiles); onnxruntime and
    a SavedModel run the float32 graph as exported (no bfloat16 kernels for them)."""
    return precision if engine == OPENVINO else "float32"


def accepts_size(height: int, width: int, fixed: tuple[int, int] | None) -> bool:
    """Whether a network of ``fixed`` input size (None: any multiple of the stride)
    runs an input of ``height`` x ``width``."""
    if fixed is not None:
        return (height, width) == fixed
    return height % STRIDE == 0 and width % STRIDE == 0


class ExportedFolds:
    """What every engine of exported networks shares: one member (file or folder) per
    fold, whether the folds are a presence classifier, and the input size the networks
    were exported at (None: any multiple of the stride)."""

    def __init__(
        self, members: Sequence[Path], presence: bool, fixed_size: tuple[int, int] | None
    ) -> None:
        if not members:
            raise ValueError("an engine needs at least one fold's network")
        self.members = list(members)
        self.is_presence = presence
        self.fixed_size = fixed_size
        self.fold = 0

    @property
    def n_folds(self) -> int:
        return len(self.members)

    def use_fold(self, fold: int) -> None:
        self.fold = fold

    def accepts(self, height: int, width: int) -> bool:
        return accepts_size(height, width, self.fixed_size)


class OpenVinoNetworks(ExportedFolds):
    """OpenVINO IR folds: a segmentation (``forward`` -> masks, presence or None) or a
    presence classifier (``presence`` True: ``forward`` -> (M, C))."""

    def __init__(
        self,
        xmls: Sequence[Path],
        precision: str = "float32",
        presence: bool = False,
        fixed_size: tuple[int, int] | None = None,
        rows: int = REQUEST_ROWS,
    ) -> None:
        import openvino as ov

        super().__init__(xmls, presence, fixed_size)
        self._ov = ov
        self.core = ov.Core()
        self.config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
        }
        self.rows = rows
        self._compiled: dict[tuple[int, int, int], Any] = {}

    def _compiled_for(self, height: int, width: int) -> Any:
        key = (self.fold, height, width)
        if key not in self._compiled:
            model = self.core.read_model(str(self.members[self.fold]))
            model.reshape({model.inputs[0].get_any_name(): [self.rows, height, width, 3]})
            self._compiled[key] = self.core.compile_model(model, "CPU", self.config)
        return self._compiled[key]

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of ``batch`` (M, H, W, 3) float32, in the model's output order."""
        compiled = self._compiled_for(int(batch.shape[1]), int(batch.shape[2]))
        n = len(batch)
        outputs: list[np.ndarray | None] = [None] * len(compiled.outputs)
        queue = self._ov.AsyncInferQueue(compiled)

        def done(request: Any, start: int) -> None:
            stop = min(start + self.rows, n)
            for i, tensor in enumerate(request.output_tensors):
                values = tensor.data
                array = outputs[i]
                if array is None:
                    array = np.empty((n, *values.shape[1:]), dtype=np.float32)
                    outputs[i] = array
                array[start:stop] = values[: stop - start]

        queue.set_callback(done)
        for start in range(0, n, self.rows):
            chunk = batch[start : start + self.rows]
            if len(chunk) < self.rows:
                pad = np.zeros((self.rows - len(chunk), *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            queue.start_async({0: np.ascontiguousarray(chunk, dtype=np.float32)}, start)
        queue.wait_all()
        return [array for array in outputs if array is not None]

    def forward(self, batch: np.ndarray) -> Any:
        """(M, H, W, 3) float32 -> masks (M, H, W, C) and presence (M, C) or None; a
        presence classifier's (M, C)."""
        outputs = self._run(batch)
        masks = next((o for o in outputs if o.ndim == 4), None)
        head = next((o for o in outputs if o.ndim == 2), None)
        if self.is_presence:
            assert head is not None, "a presence classifier outputs (M, C)"
            return head
        assert masks is not None, "a segmentation network outputs (M, H, W, C)"
        return masks, head


class OnnxNetworks(ExportedFolds):
    """ONNX folds on onnxruntime (imported here, when built): a segmentation (``forward``
    -> masks, presence or None) or a presence classifier (``presence`` True)."""

    def __init__(
        self,
        files: Sequence[Path],
        presence: bool = False,
        fixed_size: tuple[int, int] | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(files, presence, fixed_size)
        ort.set_default_logger_severity(3)  # tf2onnx's resize attributes: warnings only
        self._ort = ort
        self._sessions: dict[int, Any] = {}

    def _session(self) -> Any:
        if self.fold not in self._sessions:
            options = self._ort.SessionOptions()
            options.log_severity_level = 3
            self._sessions[self.fold] = self._ort.InferenceSession(
                str(self.members[self.fold]), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[self.fold]

    def forward(self, batch: np.ndarray) -> Any:
        """As ``OpenVinoNetworks.forward``."""
        session = self._session()
        names = [output.name for output in session.get_outputs()]
        values = session.run(names, {"images": np.ascontiguousarray(batch, dtype=np.float32)})
        outputs = dict(zip(names, values, strict=True))
        if self.is_presence:
            return outputs["presence"]
        return outputs["masks"], outputs.get("presence")

"""A fold's network as a SavedModel, OpenVINO IR and ONNX, byte for byte reproducibly
(framework layer; ``pipeline.export`` and ``pipeline.predict``'s OpenVINO and ONNX
engines use it).

``save_savedmodel`` writes the Keras model through a small ordered ``tf.Module`` with one
``serving_default`` signature: ``images`` (N, H, W, 3) float32 RGB 0-255 -> ``masks``
(N, H, W, C) float32 and, with a presence head, ``presence`` (N, C). H and W are left
open, so a view that swaps them runs too. It loads on a stock TensorFlow without
segmentation-models or this package. ``fingerprint.pb`` (a random and time-stamped
file TensorFlow adds) is removed, so two exports of the same weights are identical.

``save_openvino`` converts a SavedModel with OpenVINO's own front end and drops the
conversion parameters (paths) from its runtime info, again for identical files; the
weights stay float32 (the runtime computes in bfloat16 where the CPU supports it).

``save_onnx`` converts the same signature with tf2onnx (opset ``ONNX_OPSET``): input
``images``, outputs ``masks`` and, with a presence head, ``presence``; float32. tf2onnx
names nodes, tensors and deduplicated constants with counters and set orders that
change from process to process, so the graph is renamed canonically
(``canonical_onnx``: node, tensor and constant names by order of appearance).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_path, write_bytes
from pipeline.core.bundle import ONNX, OPENVINO
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.weights import load_best_weights

FINGERPRINT = "fingerprint.pb"
# The ONNX operator set written (onnxruntime 1.32 runs up to 23; 17 is the newest that
# tf2onnx 1.17 converts every layer of these networks to).
ONNX_OPSET = 17


class _Serving(tf.Module):
    """The exported signature around a Keras model."""

    def __init__(self, model: keras.Model) -> None:
        super().__init__(name="foldseg")
        self.model = model
        self.has_presence = len(model.outputs) > 1

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, "images")])
    def serve(self, images: Any) -> dict[str, Any]:
        outputs = self.model(images, training=False)
        if isinstance(outputs, (list, tuple)):
            result = {"masks": tf.cast(outputs[0], tf.float32)}
            if len(outputs) > 1:
                result["presence"] = tf.cast(outputs[1], tf.float32)
            return result
        key = "presence" if len(outputs.shape) == 2 else "masks"  # a classifier: (N, C)
        return {key: tf.cast(outputs, tf.float32)}


def save_savedmodel(model: keras.Model, directory: Path) -> Path:
    """Write ``model`` as a SavedModel folder at ``directory`` (inside a folder being
    built, which its caller publishes whole: ``atomic.publish_directory``)."""
    module = _Serving(model)
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    (directory / FINGERPRINT).unlink(missing_ok=True)
    return directory


def save_openvino(savedmodel: Path, xml: Path) -> Path:
    """Convert a SavedModel folder to OpenVINO IR ``xml`` and its ``.bin`` beside it (inside
    a folder being built, as ``save_savedmodel``)."""
    import openvino as ov  # the deploy extra; imported only when IR is asked for

    # OpenVINO's converter sends usage telemetry from child processes unless it runs "in
    # CI": an export sends nothing (and an offline machine does not wait on it).
    previous = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        model = ov.convert_model(str(savedmodel))
    finally:
        if previous is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = previous
    info = model.get_rt_info()
    if "conversion_parameters" in info:  # holds the input path: not reproducible
        del info["conversion_parameters"]
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def save_onnx(model: keras.Model, path: Path) -> Path:
    """Write ``model``'s exported signature as an ONNX file at ``path`` (tf2onnx, float32;
    inside a folder being built, as ``save_savedmodel``)."""
    import tf2onnx  # the deploy extra; imported only when ONNX is asked for

    module = _Serving(model)
    spec = (tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),)
    proto, _ = tf2onnx.convert.from_function(module.serve, input_signature=spec, opset=ONNX_OPSET)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, canonical_onnx(proto).SerializeToString())
    return path


def canonical_onnx(model: Any) -> Any:
    """Rename an ONNX model's nodes (``node<i>``), inner tensors (``t<k>``) and constants
    (``const<k>``, in the order first used; initializers sorted so) in place, so that two
    conversions of the same network are the same bytes. Graph inputs and outputs keep
    their names; a graph with sub-graphs (If, Loop) is left as it is."""
    graph = model.graph
    if any(attribute.g.node or attribute.graphs for n in graph.node for attribute in n.attribute):
        return model
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    initializers = {i.name: i for i in graph.initializer}
    names: dict[str, str] = {}
    counts = {"t": 0, "const": 0}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            prefix = "const" if name in initializers else "t"
            names[name] = f"{prefix}{counts[prefix]}"
            counts[prefix] += 1
        return names[name]

    for i, node in enumerate(graph.node):
        node.name = f"node{i}"
        for k, name in enumerate(node.input):
            node.input[k] = rename(name)
        for k, name in enumerate(node.output):
            node.output[k] = rename(name)
    used = [initializers[old] for old in names if old in initializers]
    for initializer in used:
        initializer.name = names[initializer.name]
    del graph.initializer[:]
    graph.initializer.extend(sorted(used, key=lambda i: int(i.name[len("const") :])))
    del graph.value_info[:]
    return model


def converted_folds(
    model: keras.Model,
    weights: Sequence[Path],
    cache: Path,
    role: str = "segmentation",
    network_format: str = OPENVINO,
) -> list[Path]:
    """Each fold's network as OpenVINO IR or ONNX, converted once:
    ``cache/<role>_<key>/<role>_fold<k>.xml`` (or ``.onnx``) where the key hashes the
    weight files (path, size, modification time), the model's configuration and the
    format, so a later prediction with the same folds reuses them."""
    if network_format not in (OPENVINO, ONNX):
        raise ValueError(f"network_format must be {OPENVINO!r} or {ONNX!r}; got {network_format!r}")
    stamps = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in weights]
    key = hashlib.sha256(
        json.dumps([stamps, model.to_json(), role, network_format], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = cache / f"{role}_{key}"
    suffix = ".xml" if network_format == OPENVINO else ".onnx"
    files = [folder / f"{role}_fold{fold}{suffix}" for fold in range(len(weights))]
    beside = [f.with_suffix(".bin") for f in files] if network_format == OPENVINO else []
    if all(f.is_file() for f in (*files, *beside)):
        return files
    with atomic_path(folder) as built, tempfile.TemporaryDirectory() as scratch:
        built.mkdir(parents=True)
        for fold, path in enumerate(weights):
            load_best_weights(model, path)
            if network_format == ONNX:
                save_onnx(model, built / files[fold].name)
                continue
            savedmodel = save_savedmodel(model, Path(scratch) / f"fold{fold}")
            save_openvino(savedmodel, built / files[fold].name)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier conversion
    return files

"""A model's weights as files and copies, in one canonical order (framework layer).

The Keras-2 HDF5 format stores a layer's weights as trainable + non-trainable, so
every save, load and copy here runs with the whole model trainable
(``all_trainable``): a file written mid-way through progressive unfreezing loads into
any model of the same architecture.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py

from pipeline.core.atomic import atomic_path
from pipeline.nn.keras_backend import (
    FRAMEWORK,
    KERAS3,
    all_layers,
    keras,
    load_legacy_weights_by_name,
)

# Keras 3 saves and loads weights only under names ending in this; the run layout keeps
# its own names (best_weights.h5), so the files are renamed (saving) or linked (loading).
_KERAS3_SUFFIX = ".weights.h5"


@contextmanager
def all_trainable(model: keras.Model) -> Iterator[None]:
    """Every layer trainable for the duration, then each layer's own flag back.

    The Keras-2 HDF5 format stores a layer's weights as trainable + non-trainable, so the
    order depends on what is frozen: a file saved mid-way through progressive
    unfreezing would not load into a model frozen differently (or into the fully
    trainable model that prediction builds). Saving and loading all-trainable makes the
    order canonical. Flags are restored parents first (setting a parent's flag resets
    its children's).
    """
    layers = [model, *all_layers(model)]
    flags = [layer.trainable for layer in layers]
    model.trainable = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.trainable = flag


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """``source``'s weights into ``target`` (the same architecture, any strategy or
    precision policy), both all-trainable so the weight lists share one order."""
    with all_trainable(source), all_trainable(target):
        target.set_weights(source.get_weights())


def copy_model(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """A model from ``build()`` holding ``model``'s weights."""
    copy = build()
    copy_weights(model, copy)
    return copy


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    suffix = _KERAS3_SUFFIX if KERAS3 else ""
    with atomic_path(path, keep_suffix=True, suffix=suffix) as tmp, all_trainable(model):
        model.save_weights(str(tmp))


def file_framework(path: Path) -> str | None:
    """Which Keras wrote a weights file: tf_keras (the Keras-2 HDF5 format), keras3, or
    None when the file is neither (damaged, or not HDF5)."""
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "model_weights" in f:
                return "tf_keras"
            if "vars" in f or "layers" in f:
                return "keras3"
    except OSError:
        return None
    return None


def check_file_framework(path: Path) -> None:
    """A clear error when ``path`` was written by the other Keras layer than this process's."""
    written = file_framework(path)
    if written is not None and written != FRAMEWORK:
        raise ValueError(
            f"weights file {path} was written by {written}, and this run uses {FRAMEWORK} "
            f"(config key framework): set framework: {written} to use it, or retrain its "
            f"fold with --force"
        )


def _load_weights(model: keras.Model, path: Path, **kwargs: Any) -> None:
    if not KERAS3:
        model.load_weights(str(path), **kwargs)
        return
    with tempfile.TemporaryDirectory() as folder:
        link = Path(folder) / ("weights" + _KERAS3_SUFFIX)
        link.symlink_to(Path(path).resolve())
        model.load_weights(str(link), **kwargs)


def load_weights_by_name(model: keras.Model, path: Path) -> None:
    """A local encoder or backbone file into ``model``, layer by layer name; layers the
    file lacks, or whose shapes differ, are skipped (``model.encoder_weights: <file>``).

    tf_keras reads Keras-2 HDF5 files; Keras 3 reads its own ``.weights.h5`` files and,
    through its legacy loader, Keras-2 ones (e.g. the keras-applications notop files).
    """
    if not KERAS3:
        model.load_weights(str(path), by_name=True, skip_mismatch=True)
    elif file_framework(Path(path)) == "tf_keras":
        with h5py.File(path, "r") as f:
            load_legacy_weights_by_name(f.get("model_weights", f), model)
    else:
        _load_weights(model, Path(path), skip_mismatch=True)


def load_best_weights(model: keras.Model, path: Path) -> None:
    """Load a file written by the trainer, whatever the model's frozen layers.

    A missing, truncated or foreign file is a ValueError naming it and what to do.
    """
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; train that fold first")
    check_file_framework(path)
    try:
        with all_trainable(model):
            _load_weights(model, path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"weights file {path} is damaged or from another model ({exc}); retrain its "
            f"fold with --force"
        ) from None


def average_weight_files(model: keras.Model, paths: Sequence[Path]) -> None:
    """Set ``model``'s weights (BatchNorm statistics included) to the mean of the files'."""
    total: list[Any] | None = None
    for path in paths:
        load_best_weights(model, path)
        with all_trainable(model):
            weights = model.get_weights()
        total = weights if total is None else [a + w for a, w in zip(total, weights, strict=True)]
    if total is None:
        raise ValueError("no weights files to average")
    with all_trainable(model):
        model.set_weights([w / len(paths) for w in total])

"""A model's weights as files and copies, in one canonical order (framework layer).

The Keras-2 HDF5 layout stores a layer's weights as trainable + non-trainable, so
every save, load and copy here runs with the whole model trainable
(``all_trainable``): a file written mid-way through progressive unfreezing loads into
any model of the same architecture.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.nn.keras_backend import keras


@contextmanager
def all_trainable(model: keras.Model) -> Iterator[None]:
    """Every layer trainable for the duration, then each layer's own flag back.

    The Keras-2 HDF5 layout stores a layer's weights as trainable + non-trainable, so the
    order depends on what is frozen: a file saved mid-way through progressive
    unfreezing would not load into a model frozen differently (or into the fully
    trainable model that prediction builds). Saving and loading all-trainable makes the
    order canonical. Flags are restored parents first (setting a parent's flag resets
    its children's).
    """
    layers = list(model._flatten_layers(include_self=True, recursive=True))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tmp." + path.name)
    with all_trainable(model):
        model.save_weights(str(tmp))
    os.replace(tmp, path)


def load_best_weights(model: keras.Model, path: Path) -> None:
    """Load a file written by the trainer, whatever the model's frozen layers.

    A missing, truncated or foreign file is a ValueError naming it and what to do.
    """
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; train that fold first")
    try:
        with all_trainable(model):
            model.load_weights(str(path))
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

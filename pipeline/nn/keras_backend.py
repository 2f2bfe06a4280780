"""The only door to TensorFlow, Keras and the segmentation-models library.

Two Keras layers can sit behind it, chosen once per process before anything imports
Keras, by ``FOLDSEG_FRAMEWORK`` (``run.process.FRAMEWORK_ENV``; the stages set it from the
config's ``framework`` key, see ``run.process.enter_framework``):

- ``tf_keras`` (default): the legacy Keras 2 package with segmentation-models 1.0.1, the
  reference recipe's library. TensorFlow picks its Keras at first import, so the two
  environment variables are set here, before that happens;
- ``keras3``: Keras 3 on its TensorFlow backend with segmodels-keras, a Keras 3 fork of
  segmentation-models with the same models, backbones, losses and API.

Every other module imports ``tf``, ``keras`` and ``sm`` from here, and the few calls
whose spelling differs between the two Keras versions from the functions below.
"""

import os
from typing import Any

from pipeline.run.process import FRAMEWORK_ENV, THREADS_ENV, framework_of_process

FRAMEWORK = framework_of_process()
KERAS3 = FRAMEWORK == "keras3"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if KERAS3:
    # A process restarted from a tf_keras one inherits the two variables below: undo them.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_USE_LEGACY_KERAS"] = "0"
    os.environ["SM_FRAMEWORK"] = "keras"
    import keras
    import segmodels_keras as sm
    import tensorflow as tf
else:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ["SM_FRAMEWORK"] = "tf.keras"
    import segmentation_models as sm  # type: ignore[no-redef]
    import tensorflow as tf
    import tf_keras as keras

# Set by pipeline.run.fold_jobs for fold processes that share the CPU: TensorFlow's
# thread pools must be sized before its runtime starts, i.e. here.
if os.environ.get(THREADS_ENV):
    _threads = int(os.environ[THREADS_ENV])
    tf.config.threading.set_intra_op_parallelism_threads(_threads)
    tf.config.threading.set_inter_op_parallelism_threads(_threads)


def check_framework(wanted: str, source: str) -> None:
    """Refuse a config whose ``framework`` is not this process's Keras (picked once, at
    this module's import): a library caller would otherwise train or predict with the
    other one silently. The stage commands switch by themselves (``run.process``)."""
    if wanted != FRAMEWORK:
        raise ValueError(
            f"{source}: framework {wanted!r}, but this process runs {FRAMEWORK!r} (the Keras "
            f"is picked once per process); set {FRAMEWORK_ENV}={wanted} before starting it"
        )


def get_value(variable: Any) -> float:
    """A scalar variable's value, e.g. an optimizer's learning rate."""
    if KERAS3:
        return float(keras.ops.convert_to_numpy(variable))
    return float(keras.backend.get_value(variable))


def set_value(variable: Any, value: float) -> None:
    """Assign a scalar variable, e.g. an optimizer's learning rate."""
    if KERAS3:
        variable.assign(value)
    else:
        keras.backend.set_value(variable, value)


def epsilon() -> float:
    """Keras' fuzz factor (1e-7 unless configured)."""
    return float(keras.config.epsilon() if KERAS3 else keras.backend.epsilon())


def all_layers(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' layers included (``model`` itself not)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def producing_layer(tensor: Any) -> Any:
    """The layer whose output a symbolic tensor of a functional model is."""
    history = tensor._keras_history
    return history.operation if KERAS3 else history.layer


def load_legacy_weights_by_name(group: Any, model: Any) -> None:
    """Keras 3: a Keras-2 HDF5 weights group (an h5py group) into ``model`` by layer
    name, layers missing from it or of another shape skipped (tf_keras' ``by_name``)."""
    from keras.src.legacy.saving import legacy_h5_format

    legacy_h5_format.load_weights_from_hdf5_group_by_name(group, model, skip_mismatch=True)


# What segmentation-models 1.0.1 is told its backbones are built with (its Keras 3 fork
# imports Keras itself).
BACKBONE_MODULES: dict[str, Any] = (
    {}
    if KERAS3
    else {
        "backend": keras.backend,
        "layers": keras.layers,
        "models": keras.models,
        "utils": keras.utils,
    }
)

# A loss's reduction over the batch: our losses return one scalar per batch already.
LOSS_REDUCTION = "sum_over_batch_size" if KERAS3 else keras.losses.Reduction.AUTO
# Elementwise binary cross-entropy of probabilities, clipped as Keras does.
binary_crossentropy = keras.ops.binary_crossentropy if KERAS3 else keras.backend.binary_crossentropy


__all__ = [
    "BACKBONE_MODULES",
    "FRAMEWORK",
    "FRAMEWORK_ENV",
    "KERAS3",
    "LOSS_REDUCTION",
    "all_layers",
    "binary_crossentropy",
    "epsilon",
    "get_value",
    "keras",
    "load_legacy_weights_by_name",
    "producing_layer",
    "set_value",
    "sm",
    "tf",
]

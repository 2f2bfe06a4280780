"""The only door to TensorFlow, tf_keras and segmentation_models.

segmentation-models 1.0.1 needs the legacy Keras 2 API. TensorFlow picks its Keras at
first import, so the two environment variables must be set before that happens; every
other module imports ``tf``, ``keras`` and ``sm`` from here and never sets them itself.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["SM_FRAMEWORK"] = "tf.keras"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import segmentation_models as sm
import tensorflow as tf
import tf_keras as keras

from pipeline.run.cli import THREADS_ENV

# Set by pipeline.run.fold_jobs for fold processes that share the CPU: TensorFlow's
# thread pools must be sized before its runtime starts, i.e. here.
if os.environ.get(THREADS_ENV):
    _threads = int(os.environ[THREADS_ENV])
    tf.config.threading.set_intra_op_parallelism_threads(_threads)
    tf.config.threading.set_inter_op_parallelism_threads(_threads)

__all__ = ["keras", "sm", "tf"]

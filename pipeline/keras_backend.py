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

__all__ = ["keras", "sm", "tf"]

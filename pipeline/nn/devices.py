"""tf.distribute strategies, mixed precision, seeding and the device name (Keras layer)."""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Iterator

import numpy as np

from pipeline.core.precision import BF16_CPU_FLAGS, POLICIES, choose_precision, cpu_flags
from pipeline.nn.keras_backend import KERAS3, keras, tf

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
# Measured with Keras 3.15 (TensorFlow backend): fit() reduces its first batch across the
# replicas to build the model (Trainer._maybe_symbolic_build), which fails under
# MultiWorkerMirroredStrategy ("Attempt to convert a value (PerReplica...) to a Tensor"),
# and the other workers then wait for the dead one.
KERAS3_MULTI_WORKER = (
    "train.strategy 'multi_worker' needs framework tf_keras: Keras 3 fails at a worker's "
    "first batch under MultiWorkerMirroredStrategy; use train.strategy mirrored (the "
    "devices of one machine) or framework tf_keras"
)


def split_cpu(n_devices: int) -> None:
    """Split the CPU into ``n_devices`` logical devices (tests of the multi-device path).

    Must run before TensorFlow initialises its devices, i.e. before any op executes.
    """
    if n_devices < 2:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n_devices)]
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot split the CPU into {n_devices} logical devices: TensorFlow has already "
            f"initialised its devices in this process ({exc})"
        ) from exc


def check_strategy(name: str) -> None:
    """ValueError unless ``train.strategy`` ``name`` can run on this process's Keras."""
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}; got {name!r}")
    if KERAS3 and name == "multi_worker":
        raise ValueError(KERAS3_MULTI_WORKER)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The ``train.strategy`` of config.

    auto: mirrored over all GPUs when there are several, else TensorFlow's default
    strategy (no wrapper: on a 2-core CPU, OneDeviceStrategy made a demo epoch 2.0x
    slower, 20.6 s against 10.0 s). one_device: OneDeviceStrategy on the first GPU, or
    the CPU. mirrored: all GPUs, or all logical CPUs when
    there is no GPU. multi_worker: MultiWorkerMirroredStrategy (cluster from TF_CONFIG).
    """
    check_strategy(name)
    if name == "multi_worker":
        return _multi_worker()  # before anything (even listing devices) starts TensorFlow
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "auto":
        return tf.distribute.get_strategy()
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


@functools.cache
def _multi_worker() -> tf.distribute.Strategy:
    # One per process: the collectives are configured once, at the first TensorFlow op.
    return tf.distribute.MultiWorkerMirroredStrategy()


def set_mixed_precision(setting: bool | str) -> str | None:
    """The training policy of ``train.mixed_precision``; returns the mixed policy in use
    (``mixed_float16`` or ``mixed_bfloat16``) or None for float32.

    ``true``: ``mixed_float16`` on a GPU (with loss scaling), ignored on a CPU, which has
    no fast float16. ``bfloat16``: ``mixed_bfloat16`` on any device (no loss scaling:
    bfloat16 has float32's range); fast on CPUs with AVX512-BF16 or AMX and on recent GPUs.
    """
    policy = None
    if setting == "bfloat16":
        policy = "mixed_bfloat16"
        fast = BF16_CPU_FLAGS & cpu_flags()
        if not fast and not tf.config.list_physical_devices("GPU"):
            log.warning(
                "train.mixed_precision: bfloat16 on a CPU without AVX512-BF16 or AMX: "
                "emulated, likely slower than float32"
            )
    elif setting is True:
        if tf.config.list_physical_devices("GPU"):
            policy = "mixed_float16"
        else:
            log.warning("train.mixed_precision is ignored: no GPU, training runs in float32")
    keras.mixed_precision.set_global_policy(policy or "float32")
    return policy


def inference_precision(requested: str) -> str:
    """``predict.precision`` resolved on this machine (``core.precision.choose_precision``)."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability:
            capabilities.append((int(capability[0]), int(capability[1])))
    return choose_precision(requested, cpu_flags(), capabilities)


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Models built inside compute in ``precision`` (weights and outputs stay float32)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow (ops stay nondeterministic unless TF is told)."""
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def device_name() -> str:
    """``"<n> x <GPU name>"``, or ``"CPU"`` without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)} x {details.get('device_name', 'GPU')}"
    return "CPU"

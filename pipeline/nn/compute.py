"""How much arithmetic a model costs and how fast this machine can do it (Keras layer).

``forward_flops`` counts the floating-point operations of one forward pass of a model
on one image of a given size, by TensorFlow's own profiler over the traced inference
graph (a multiply-add counts as 2). A training step costs about 3 forward passes (the
forward, and the backward's gradients with respect to activations and to weights).
``matmul_peak`` measures the best GFLOP/s of a large square matrix product in a given
dtype: the practical ceiling of this CPU or GPU for dense arithmetic, measured in the
same process as the benchmark it is compared with. Used by the benchmarks.
"""

from __future__ import annotations

import time

from pipeline.nn.keras_backend import keras, tf

# Forward + gradient w.r.t. activations + gradient w.r.t. weights.
TRAIN_STEP_FORWARDS = 3


def forward_flops(model: keras.Model, height: int, width: int, channels: int = 3) -> int:
    """Floating-point operations of ``model`` on one ``height`` x ``width`` image."""
    spec = tf.TensorSpec([1, height, width, channels], tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    verbosity = tf.compat.v1.logging.get_verbosity()
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    try:
        profile = tf.compat.v1.profiler.profile(
            graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
        )
    finally:
        tf.compat.v1.logging.set_verbosity(verbosity)
    return int(profile.total_float_ops)


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` on this device."""
    a = tf.cast(tf.random.stateless_normal([size, size], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal([size, size], seed=[3, 4]), dtype)
    product = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.linalg.matmul(x, y)[0], "float32")))
    product(a, b).numpy()  # trace and warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def achieved_gflops(flops_per_image: float, seconds_per_image: float) -> float:
    """GFLOP/s achieved by a pass that costs ``flops_per_image`` and took that long."""
    return flops_per_image / seconds_per_image / 1e9

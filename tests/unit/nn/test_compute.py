"""FLOP counting and the matmul peak used by the benchmarks."""

from pipeline.nn.compute import achieved_gflops, forward_flops, matmul_peak
from pipeline.nn.keras_backend import keras


def test_forward_flops_counts_convolutions_and_dense_layers_as_multiply_adds() -> None:
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, use_bias=False)(x)
    model = keras.Model(inputs, outputs)
    conv = 2 * 16 * 20 * 3 * 3 * 3 * 8
    depthwise = 2 * 16 * 20 * 3 * 3 * 8
    dense = 2 * 8 * 2
    flops = forward_flops(model, 16, 20)
    assert conv + depthwise + dense <= flops <= (conv + depthwise + dense) * 1.05
    # The count scales with the image area of a fully convolutional part.
    assert forward_flops(model, 32, 20) > 1.9 * (conv + depthwise)


def test_matmul_peak_is_a_positive_rate_and_achieved_divides() -> None:
    assert matmul_peak("float32", size=128, repeats=2) > 0
    assert achieved_gflops(4e9, 2.0) == 2.0

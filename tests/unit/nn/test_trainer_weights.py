"""Best-weights files load whatever is frozen at save or load time."""

import numpy as np

from pipeline.nn.model import build_segmentation_model, set_encoder_trainable
from pipeline.nn.weights import load_best_weights, save_weights_atomic


def test_weights_saved_with_a_frozen_encoder_load_into_a_trainable_model(tmp_path):
    frozen = build_segmentation_model("Unet", "resnet18", 2, decoder_filters=[16, 8, 8, 8, 8])
    set_encoder_trainable(frozen, False)
    n_trainable = len(frozen.trainable_weights)
    path = tmp_path / "best_weights.h5"
    save_weights_atomic(frozen, path)
    assert len(frozen.trainable_weights) == n_trainable  # flags restored
    fresh = build_segmentation_model("Unet", "resnet18", 2, decoder_filters=[16, 8, 8, 8, 8])
    load_best_weights(fresh, path)
    # A weight's unique name: its path in Keras 3, its name in tf_keras.
    want = {getattr(w, "path", w.name): w.numpy() for w in frozen.weights}
    for w in fresh.weights:
        np.testing.assert_array_equal(w.numpy(), want[getattr(w, "path", w.name)])
    x = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(fresh.predict_on_batch(x), frozen.predict_on_batch(x), atol=1e-6)

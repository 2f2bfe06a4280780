"""model.classification_head: the presence head's model, targets, loss, logs and TTA."""

import numpy as np
import pytest

from pipeline.nn.callbacks import FirstOutputLogs
from pipeline.nn.inference import predict_tta, predict_tta_outputs
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.losses import get_loss, segmentation_compile_args, with_presence_targets
from pipeline.nn.model import (
    MASK_OUTPUT,
    PRESENCE_OUTPUT,
    build_segmentation_model,
    encoder_layers,
    has_presence_head,
    set_encoder_fraction,
)
from pipeline.nn.optim import make_optimizer


@pytest.mark.parametrize(
    ("architecture", "size", "features"),
    [
        ("Unet", (64, 96), (2, 3, 512)),  # stride 32
        ("FPN", (64, 96), (2, 3, 512)),
        ("Linknet", (64, 96), (2, 3, 512)),
        ("PSPNet", (96, 96), (12, 12, 128)),  # its decoder starts at stride 8
    ],
)
def test_the_head_sits_on_the_encoders_deepest_features(architecture, size, features):
    model = build_segmentation_model(
        architecture, "resnet18", 3, input_size=size, classification_head=True
    )
    assert has_presence_head(model)
    assert model.output_names == [MASK_OUTPUT, PRESENCE_OUTPUT]
    masks, presence = model.predict_on_batch(np.zeros((2, *size, 3), np.float32))
    assert masks.shape == (2, *size, 3) and presence.shape == (2, 3)
    assert masks.dtype == presence.dtype == np.float32
    pool = model.get_layer("presence_pool")
    assert tuple(pool.input.shape) == (None, *features)
    channels = features[-1]
    # The head adds a pool and one dense layer; the encoder is the same layers.
    plain = build_segmentation_model(architecture, "resnet18", 3, input_size=size)
    assert not has_presence_head(plain)
    assert model.count_params() - plain.count_params() == channels * 3 + 3
    # (Auto-named layers such as zero_padding2d_N differ between two builds.)
    assert len(encoder_layers(model)) == len(encoder_layers(plain))
    assert sum(
        w.shape.num_elements() for layer in encoder_layers(model) for w in layer.weights
    ) == sum(w.shape.num_elements() for layer in encoder_layers(plain) for w in layer.weights)
    set_encoder_fraction(model, 0.0)
    assert model.get_layer("presence_logits").trainable


def test_without_the_head_the_model_is_unchanged():
    plain = build_segmentation_model("Unet", "resnet18", 2)
    assert plain.output_names == [MASK_OUTPUT]
    args = segmentation_compile_args(plain, "jaccard", 0.5, 0)
    head = build_segmentation_model("Unet", "resnet18", 2, classification_head=True)
    with pytest.raises(ValueError, match="model.classification_head_weight"):
        segmentation_compile_args(head, "jaccard", 0.5, 0)
    assert set(args) == {"loss", "metrics"} and args["loss"].name == get_loss("jaccard").name


def test_presence_targets_are_the_masks_any_pixel_after_cropping():
    masks = np.zeros((2, 4, 4, 3), np.float32)
    masks[0, 1, 1, 0] = 1.0  # class 0 of image 0 present
    masks[1, :, :, 2] = 0.4  # soft values under 0.5 are absent
    masks[1, 0, 0, 1] = 0.6
    model = build_segmentation_model("Unet", "resnet18", 3, classification_head=True)
    plain = build_segmentation_model("Unet", "resnet18", 3)
    ds = tf.data.Dataset.from_tensors((np.zeros((2, 4, 4, 3), np.float32), masks))
    assert with_presence_targets(ds, plain) is ds
    _, targets = next(iter(with_presence_targets(ds, model)))
    np.testing.assert_array_equal(targets[MASK_OUTPUT].numpy(), masks)
    np.testing.assert_array_equal(targets[PRESENCE_OUTPUT].numpy(), [[1, 0, 0], [0, 1, 0]])


def test_the_loss_is_the_mask_loss_plus_the_weighted_cross_entropy():
    keras.utils.set_random_seed(3)
    model = build_segmentation_model("Unet", "resnet18", 2, classification_head=True)
    model.compile(
        optimizer=make_optimizer(1e-3, 1),
        **segmentation_compile_args(model, "jaccard", 0.5, 0, 0.3),
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    masks = (rng.uniform(size=(4, 32, 32, 2)) > 0.7).astype(np.float32)
    masks[:2, ..., 1] = 0
    ds = with_presence_targets(tf.data.Dataset.from_tensors((images, masks)), model)
    logs = model.evaluate(ds, return_dict=True, verbose=0)
    pred_masks, _ = model.predict_on_batch(images)
    mask_loss = float(get_loss("jaccard")(masks, pred_masks))
    present = (masks.max(axis=(1, 2)) > 0.5).astype(np.float64)
    # Keras takes the cross-entropy from the sigmoid's logits: exact, unclipped.
    logits = keras.Model(model.input, model.get_layer("presence_logits").output)
    z = logits.predict_on_batch(images).astype(np.float64)
    bce = float(np.mean(np.maximum(z, 0) - z * present + np.log1p(np.exp(-np.abs(z)))))
    assert logs["prob_loss"] == pytest.approx(mask_loss, abs=1e-5)
    assert logs["presence_loss"] == pytest.approx(bce, abs=1e-4)
    assert logs["loss"] == pytest.approx(mask_loss + 0.3 * bce, abs=1e-4)
    assert "prob_dice" in logs and "presence_dice" not in logs  # metrics on the masks only


def test_first_output_logs_renames_the_mask_metrics_only():
    logs = {
        "loss": 1.0,
        "prob_loss": 0.8,
        "presence_loss": 2.0,
        "prob_dice": 0.5,
        "val_loss": 1.1,
        "val_prob_loss": 0.9,
        "val_prob_dice": 0.4,
        "val_prob_kaggle_dice": 0.3,
        "lr": 0.1,
    }
    FirstOutputLogs(MASK_OUTPUT).on_epoch_end(0, logs)
    assert logs == {
        "loss": 1.0,
        "prob_loss": 0.8,
        "presence_loss": 2.0,
        "dice": 0.5,
        "val_loss": 1.1,
        "val_prob_loss": 0.9,
        "val_dice": 0.4,
        "val_kaggle_dice": 0.3,
        "lr": 0.1,
    }


def test_tta_gives_the_same_masks_and_the_view_mean_presence():
    keras.utils.set_random_seed(5)
    model = build_segmentation_model("Unet", "resnet18", 2, classification_head=True)
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 64, 3), dtype=np.uint8)
    views = ["identity", "hflip", "vflip", "rot90"]
    masks, presence = predict_tta_outputs(model, images, views)
    np.testing.assert_allclose(masks, predict_tta(model, images, views), atol=1e-6)
    expected = []
    for view in views:
        turned = {
            "identity": images,
            "hflip": images[:, :, ::-1],
            "vflip": images[:, ::-1],
            "rot90": np.rot90(images, 1, axes=(1, 2)),
        }[view]
        expected.append(model.predict_on_batch(turned.astype(np.float32))[1])
    np.testing.assert_allclose(presence, np.mean(expected, axis=0), atol=1e-5)
    plain = build_segmentation_model("Unet", "resnet18", 2)
    assert predict_tta_outputs(plain, images, views)[1] is None

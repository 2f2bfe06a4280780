"""The presence classifier: labels, model building, weights, datasets, TTA prediction."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.metrics import score_presence
from pipeline.nn.classifier import (
    ImageSampler,
    build_classifier,
    classifier_fold_dir,
    copy_segmentation_encoder,
    list_classifier_backbones,
    make_presence_eval_dataset,
    make_presence_train_dataset,
    predict_presence_tta,
    presence_labels,
    stage_outputs,
    stage_strides,
)
from pipeline.nn.data import build_augmentation
from pipeline.nn.keras_backend import KERAS3, all_layers, keras, producing_layer, sm, tf
from pipeline.nn.weights import load_best_weights, save_weights_atomic
from pipeline.run.image_cache import ImageCache

# ResNet-18 layers by segmentation-models' names, and by its Keras 3 fork's
# (keras.applications' ResNet naming).
FIRST_CONV = "conv1_conv" if KERAS3 else "conv0"
STAGE3_CONV = "conv4_block1_1_conv" if KERAS3 else "stage3_unit1_conv1"


def test_labels_are_one_where_the_rle_is_non_empty():
    table = pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "b", "c"],
            "class_name": ["Fish", "Sugar", "Fish", "Sugar", "Fish"],
            "rle": ["1 3", "", np.nan, "5 2", "  "],
        }
    )
    labels = presence_labels(table, ["Fish", "Sugar"], ["c", "a", "b"])
    # c has no Sugar row at all (absent) and a blank Fish RLE.
    np.testing.assert_array_equal(labels, [[0, 0], [1, 0], [0, 1]])
    assert labels.dtype == np.float32
    with pytest.raises(KeyError, match="no rows in the mask table.*'zz'"):
        presence_labels(table, ["Fish", "Sugar"], ["a", "zz"])


@pytest.mark.parametrize(
    ("backbone", "size"),
    [
        ("resnet18", (32, 64)),
        pytest.param("efficientnetb0", (32, 64), marks=pytest.mark.slow),
        pytest.param("mobilenetv2", (32, 32), marks=pytest.mark.slow),
    ],
)
def test_models_build_and_give_one_probability_per_class(backbone, size):
    model = build_classifier(backbone, 3, size, dropout=0.3, bn_momentum=0.9)
    x = np.random.default_rng(0).integers(0, 256, (2, *size, 3)).astype(np.float32)
    y = model.predict_on_batch(x)
    assert y.shape == (2, 3) and y.dtype == np.float32
    assert ((y >= 0) & (y <= 1)).all()
    momenta = {
        layer.momentum
        for layer in all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.9}


def test_xception_builds_with_its_minus_one_to_one_normalisation():
    model = build_classifier("xception", 2, (96, 96))
    assert tuple(model.output.shape) == (None, 2)
    normalise = model.get_layer("normalise")
    x = np.array([[[[0.0, 127.5, 255.0]]]], dtype=np.float32)
    np.testing.assert_allclose(normalise(x).numpy().reshape(3), [-1.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(("pooling", "width"), [("avg", 1280), ("max", 1280), ("avgmax", 2560)])
def test_pooling_of_the_last_feature_map(pooling, width):
    model = build_classifier("mobilenetv2", 3, (64, 64), pooling=pooling)
    assert tuple(model.get_layer("pool").output.shape) == (None, width)
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.float32)
    assert model.predict_on_batch(x).shape == (2, 3)


def _backbone(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def test_multiscale_pooling_pools_every_stage_and_concatenates():
    model = build_classifier("resnet18", 3, (64, 96), pooling="avgmax", multiscale=True)
    base = _backbone(model)
    assert stage_strides(base) == [2, 4, 8, 16, 32]
    # ResNet-18's stages have 64, 64, 128, 256, 512 channels; avg and max of each.
    assert tuple(model.get_layer("pool").output.shape) == (None, 2 * (64 + 64 + 128 + 256 + 512))
    maps = [tuple(t.shape[1:3]) for t in base.outputs]
    assert maps == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3)).astype(np.float32)
    assert model.predict_on_batch(x).shape == (2, 3)
    single = build_classifier("resnet18", 3, (64, 96), pooling="avg")
    assert tuple(single.get_layer("pool").output.shape) == (None, 512)


@pytest.mark.parametrize("backbone", ["efficientnetb0", "resnet34", "mobilenetv2"])
def test_stages_are_the_skip_layers_segmentation_models_uses(backbone):
    # Found from the layer graph, they must agree with segmentation-models' own table
    # of skip connections (strides 16, 8, 4, 2), with the backbone's output as stride 32.
    base = _backbone(build_classifier(backbone, 2, (64, 64), multiscale=True))
    names = [producing_layer(t).name for t in base.outputs]
    assert names[:4] == list(reversed(sm.Backbones.get_feature_layers(backbone, n=4)))
    assert producing_layer(base.outputs[-1]) is base.layers[-1]


@pytest.mark.parametrize(
    ("backbone", "size", "top"),
    [
        ("seresnext50", (64, 96), (2, 3)),  # squeeze-excitation vectors, group slices
        ("xception", (96, 96), (3, 3)),  # "valid" convolutions: 47, 45, 23 ... pixels
    ],
)
def test_stages_of_backbones_with_odd_layers(backbone, size, top):
    if backbone not in list_classifier_backbones():
        pytest.skip(f"{backbone} is not in this framework's segmentation library")
    base = _backbone(build_classifier(backbone, 2, size, multiscale=True))
    assert stage_strides(base) == [2, 4, 8, 16, 32]
    assert tuple(base.outputs[-1].shape[1:3]) == top
    assert all(t.shape[-1] >= 64 for t in base.outputs)  # whole maps, not channel slices


def test_stage_outputs_refuses_a_backbone_whose_output_is_not_its_deepest_stage():
    inputs = keras.Input((32, 32, 3))
    deep = keras.layers.Conv2D(4, 3, strides=4, padding="same", name="deep")(inputs)
    assert stage_strides(keras.Model(inputs, deep)) == [4]
    upsampled = keras.layers.UpSampling2D(2, name="up")(deep)  # an output at stride 2
    with pytest.raises(ValueError, match="backbone odd: its output is not the last layer"):
        stage_outputs(keras.Model(inputs, upsampled, name="odd"))


def test_multiscale_classifier_takes_the_segmentation_encoder_and_local_weights(tmp_path):
    from pipeline.nn.model import build_segmentation_model, encoder_layers

    segmentation = build_segmentation_model("Unet", "resnet18", 2)
    classifier = build_classifier("resnet18", 2, (64, 64), multiscale=True)
    assert copy_segmentation_encoder(classifier, segmentation) > 10
    source = {layer.name: layer for layer in encoder_layers(segmentation)}
    np.testing.assert_array_equal(
        _backbone(classifier).get_layer(STAGE3_CONV).get_weights()[0],
        source[STAGE3_CONV].get_weights()[0],
    )
    path = tmp_path / "classifier.h5"
    save_weights_atomic(classifier, path)
    again = build_classifier("resnet18", 2, (64, 64), multiscale=True)
    load_best_weights(again, path)
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(again.predict_on_batch(x), classifier.predict_on_batch(x), rtol=1e-5)


def test_segmentation_encoder_is_copied_into_the_classifier_backbone():
    from pipeline.nn.model import build_segmentation_model, encoder_layers

    segmentation = build_segmentation_model("Unet", "resnet18", 2)
    classifier = build_classifier("resnet18", 2, (64, 64))
    copied = copy_segmentation_encoder(classifier, segmentation)
    source = {layer.name: layer for layer in encoder_layers(segmentation)}
    base = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    with_weights = [layer for layer in base.layers if layer.weights]
    assert copied == len(with_weights) > 10
    for layer in with_weights:
        for got, want in zip(layer.get_weights(), source[layer.name].get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no layer of the segmentation encoder"):
        copy_segmentation_encoder(build_classifier("mobilenetv2", 2, (64, 64)), segmentation)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"classifier.backbone must be one of \[.*'xception'\]"):
        build_classifier("resnet19", 2, (32, 32))
    assert "efficientnetb7" in list_classifier_backbones()
    with pytest.raises(ValueError, match="classifier.dropout must be in"):
        build_classifier("resnet18", 2, (32, 32), dropout=1.0)
    with pytest.raises(ValueError, match="n_classes must be at least 1; got 0"):
        build_classifier("resnet18", 0, (32, 32))
    with pytest.raises(
        ValueError, match=r"classifier.pooling must be one of \['avg', 'max', 'avgmax'\]"
    ):
        build_classifier("resnet18", 2, (32, 32), pooling="sum")


def test_missing_local_weights_file_is_an_error():
    with pytest.raises(FileNotFoundError, match="classifier.weights.*no file at /no/such.h5"):
        build_classifier("resnet18", 2, (32, 32), weights="/no/such.h5")


def test_local_weights_file_is_loaded_by_layer_name(tmp_path):
    source = build_classifier("resnet18", 2, (32, 32))
    backbone = next(layer for layer in source.layers if isinstance(layer, keras.Model))
    for w in backbone.weights:
        w.assign(np.full(w.shape, 0.25, dtype=np.float32))
    # Each Keras writes its own format (Keras 3 only under a .weights.h5 name).
    path = tmp_path / ("resnet18_notop" + (".weights.h5" if KERAS3 else ".h5"))
    backbone.save_weights(str(path))
    model = build_classifier("resnet18", 4, (32, 32), weights=str(path))
    loaded = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    np.testing.assert_allclose(loaded.get_layer(FIRST_CONV).get_weights()[0], 0.25)


def test_fold_dir_is_under_the_classifier_stage(tmp_path):
    config = load_config(overrides=[f"runs_dir={tmp_path}", "experiment=e"])
    assert classifier_fold_dir(config, 2) == Path(tmp_path) / "e" / "classifier" / "fold_2"


class _ChannelMean(keras.Model):
    """A stand-in classifier whose output is the mean of each channel over the image / 255."""

    def call(self, x):
        return tf.reduce_mean(x, axis=(1, 2)) / 255.0


def test_tta_is_the_mean_over_views_and_flips_keep_presence():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    model = _ChannelMean(name="channel_mean")
    expected = images.reshape(5, -1, 3).mean(axis=1) / 255.0
    got = predict_presence_tta(model, images, ["identity", "hflip", "vflip", "rot90"])
    assert got.shape == (5, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 3\)"):
        predict_presence_tta(model, images[..., 0], ["identity"])


def test_tta_views_are_predicted_in_one_call():
    class Recorder(keras.Model):
        """Outputs the top-left pixel's first two channels; records each batch shape."""

        def __init__(self):
            super().__init__()
            self.shapes = []

        def call(self, x):
            return x[:, 0, 0, :2]

        def predict_on_batch(self, x):
            self.shapes.append(x.shape)
            return super().predict_on_batch(x)

    model = Recorder()
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    got = predict_presence_tta(model, images, ["identity", "hflip"])
    assert list(model.shapes) == [(4, 2, 2, 3)]
    # The identity view's top-left pixel and the flipped view's (the original top-right).
    expected = (images[:, 0, 0, :2].astype(np.float32) + images[:, 0, 1, :2]) / 2
    np.testing.assert_allclose(got, expected)


def _cache(n=6, size=(8, 12), classes=2):
    rng = np.random.default_rng(0)
    return ImageCache(
        directory=Path("mem"),
        image_ids=[f"i{k}" for k in range(n)],
        original_sizes=np.tile(size, (n, 1)),
        images=rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
        masks=np.zeros((n, *size, classes), dtype=np.uint8),
    )


def test_datasets_pair_each_image_with_its_cache_row_label():
    cache = _cache()
    labels = np.eye(6, 2, dtype=np.float32) + np.eye(6, 2, -2, dtype=np.float32)
    ds = make_presence_eval_dataset(cache, np.array([4, 0, 2]), labels, batch_size=2)
    batches = list(ds.as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    got = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(images, cache.images[[4, 0, 2]].astype(np.float32))
    np.testing.assert_array_equal(got, labels[[4, 0, 2]])

    sampler = ImageSampler(cache, None, seed=1)
    train = make_presence_train_dataset(sampler, np.array([1, 3, 5]), labels, 2, 0, 2, 1)
    for images, got in train.take(3).as_numpy_iterator():
        assert images.shape == (2, 8, 12, 3) and got.shape == (2, 2)
        for image, label in zip(images, got, strict=True):
            row = next(
                r for r in (1, 3, 5) if np.array_equal(cache.images[r].astype(np.float32), image)
            )
            np.testing.assert_array_equal(label, labels[row])
    with pytest.raises(ValueError, match=r"labels must be \(n_cached_images, C\) = \(6, C\)"):
        make_presence_eval_dataset(cache, np.array([0]), labels[:3], 2)


def test_augmented_samples_are_reproducible_per_counter():
    cache = _cache()
    augment = build_augmentation([{"name": "HorizontalFlip", "params": {"p": 0.5}}])
    a = ImageSampler(cache, augment, seed=5)
    b = ImageSampler(
        cache, build_augmentation([{"name": "HorizontalFlip", "params": {"p": 0.5}}]), 5
    )
    draws = [a(np.int64(2), np.int64(k)) for k in range(8)]
    for k, image in enumerate(draws):
        np.testing.assert_array_equal(image, b(np.int64(2), np.int64(k)))
        assert np.array_equal(image, cache.images[2]) or np.array_equal(
            image, cache.images[2][:, ::-1]
        )
    assert any(not np.array_equal(d, cache.images[2]) for d in draws)


def test_presence_scores_hand_computed():
    truth = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=np.float32)
    prob = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.1, 0.3]], dtype=np.float32)
    scores = score_presence(truth, prob, ["A", "B"])
    # A: positives 0.9, 0.4 vs negatives 0.6, 0.1 -> 3 of 4 pairs ordered: AUC 0.75.
    assert scores["oof_auc_per_class"]["A"] == pytest.approx(0.75)
    assert np.isnan(scores["oof_auc_per_class"]["B"])  # one label only
    assert scores["oof_auc"] == pytest.approx(0.75)
    # At 0.5: A predicts [1, 1, 0, 0] -> tp 1, fp 1, fn 1, tn 1; B predicts [0, 1, 0, 0].
    assert scores["oof_accuracy_050"] == pytest.approx(5 / 8)
    assert scores["oof_sensitivity_050"] == pytest.approx(1 / 2)
    assert scores["oof_specificity_050"] == pytest.approx(4 / 6)
    assert scores["oof_per_class_050"]["B"]["specificity"] == pytest.approx(3 / 4)
    assert np.isnan(scores["oof_per_class_050"]["B"]["sensitivity"])
    with pytest.raises(ValueError, match=r"must both be \(N, 2\)"):
        score_presence(truth, prob[:, :1], ["A", "B"])


def test_init_from_segmentation_needs_the_same_backbone_and_a_trained_fold(tmp_path):
    from pipeline.train_classifier import init_from_segmentation

    config = load_config(
        overrides=[f"runs_dir={tmp_path}", "classifier.init_from_segmentation=true"]
    )
    with pytest.raises(ValueError, match="needs classifier.backbone == model.backbone"):
        init_from_segmentation(config, None, 0, 2)
    same = load_config(overrides=[f"runs_dir={tmp_path}", "classifier.backbone=efficientnetb2"])
    with pytest.raises(
        FileNotFoundError, match=r"fold_1/best_weights.h5: train segmentation fold 1"
    ):
        init_from_segmentation(same, None, 1, 2)


def test_tta_runs_rotations_of_rectangles_at_the_swapped_shape_or_drops_them():
    images = np.random.default_rng(4).integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)

    def dense(shape):
        inputs = keras.Input(shape)
        x = keras.layers.Conv2D(2, 3, padding="same", activation="sigmoid")(inputs)
        return keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(x))

    free = dense((None, None, 3))
    fixed = dense((32, 64, 3))
    fixed.set_weights(free.get_weights())
    both = predict_presence_tta(free, images, ["identity", "rot90"])
    rotated = free.predict_on_batch(np.rot90(images, axes=(1, 2)).astype(np.float32))
    expected = (free.predict_on_batch(images.astype(np.float32)) + rotated) / 2
    np.testing.assert_allclose(both, expected, rtol=1e-5)
    # The fixed 32x64 model cannot take 64x32 inputs: rot90 is dropped, identity stays.
    np.testing.assert_allclose(
        predict_presence_tta(fixed, images, ["identity", "rot90"]),
        fixed.predict_on_batch(images.astype(np.float32)),
        rtol=1e-5,
    )

"""Keras losses and metrics: agreement with the numpy formulas, reloadability, errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import metrics
from pipeline.nn import losses
from pipeline.nn import metrics as nn_metrics
from pipeline.nn.keras_backend import KERAS3, keras, sm, tf

REPO = Path(__file__).resolve().parents[3]
LOSS_NAMES = ["jaccard", "dice", "bce_jaccard", "bce_dice", "focal_dice", "lovasz"]


def random_batches(seed: int, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(truth uint8, prob float32) batches of shape (n, 8, 10, 3) with empty masks mixed in.

    Truth masks are blobs with some images or classes empty; probabilities are noisy
    so that thresholding yields small, large and empty predicted masks.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for n in sizes:
        truth = (rng.random((n, 8, 10, 3)) < rng.random((n, 1, 1, 3)) * 0.6).astype(np.uint8)
        truth[rng.random((n, 1, 1, 3)).repeat(8, 1).repeat(10, 2) < 0.3] = 0
        prob = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.5, 0, 1).astype(np.float32)
        prob[rng.random((n, 1, 1, 3)).repeat(8, 1).repeat(10, 2) < 0.2] *= 0.3
        batches.append((truth, prob))
    return batches


def accumulate(metric: keras.metrics.Metric, batches: list, graph: bool) -> float:
    def update(truth: tf.Tensor, prob: tf.Tensor) -> None:
        metric.update_state(truth, prob)

    step = tf.function(update) if graph else update
    for truth, prob in batches:
        step(tf.constant(truth), tf.constant(prob))
    return float(metric.result())


def concat(batches: list) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([t for t, _ in batches]), np.concatenate([p for _, p in batches])


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize(("threshold", "min_area"), [(0.5, 0), (0.4, 20), (0.7, 5)])
def test_keras_metrics_match_numpy_over_accumulated_batches(
    graph: bool, threshold: float, min_area: int
) -> None:
    batches = random_batches(seed=min_area, sizes=[3, 1, 5, 2])
    truth, prob = concat(batches)
    # The data must exercise every branch of the Kaggle rule.
    scores = metrics.kaggle_dice(truth, prob, threshold, min_area)
    assert (scores == 1.0).any() and (scores == 0.0).any()

    dice, kaggle_dice, kaggle_accuracy = nn_metrics.get_metrics(threshold, min_area)
    assert accumulate(dice, batches, graph) == pytest.approx(
        metrics.soft_dice(truth, prob), abs=1e-5
    )
    assert accumulate(kaggle_dice, batches, graph) == pytest.approx(scores.mean(), abs=1e-5)
    assert accumulate(kaggle_accuracy, batches, graph) == pytest.approx(
        metrics.presence_accuracy(truth, prob, threshold, min_area), abs=1e-5
    )


def numpy_metrics(truth: np.ndarray, prob: np.ndarray, threshold: float, min_area: int) -> list:
    """The numpy values that ``metrics.get_metrics(threshold, min_area)`` must reproduce."""
    prob = prob.astype(np.float32)
    return [
        metrics.soft_dice(truth, prob),
        metrics.kaggle_dice_mean(truth, prob, threshold, min_area),
        metrics.presence_accuracy(truth, prob, threshold, min_area),
    ]


def test_keras_metrics_accept_float16_predictions_and_reset() -> None:
    batches = [(t, p.astype(np.float16)) for t, p in random_batches(seed=1, sizes=[4, 3])]
    all_seen = numpy_metrics(*concat(batches), 0.5, 10)
    first_only = numpy_metrics(*batches[0], 0.5, 10)
    for metric, expected, expected_first in zip(
        nn_metrics.get_metrics(0.5, 10), all_seen, first_only, strict=True
    ):
        assert accumulate(metric, batches, graph=True) == pytest.approx(expected, abs=1e-5)
        metric.reset_state()
        assert accumulate(metric, batches[:1], graph=False) == pytest.approx(
            expected_first, abs=1e-5
        )
    assert all_seen != pytest.approx(first_only, abs=1e-3)  # the reset is observable


def test_keras_metrics_inside_model_evaluate_match_numpy() -> None:
    inputs = keras.Input((8, 10, 3))
    model = keras.Model(
        inputs, keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid")(inputs)
    )
    model.compile(loss=losses.get_loss("jaccard"), metrics=nn_metrics.get_metrics(0.5, 4))
    truth, prob = concat(random_batches(seed=2, sizes=[7]))
    results = model.evaluate(prob, truth, batch_size=3, verbose=0, return_dict=True)
    predicted = model.predict(prob, batch_size=3, verbose=0)
    assert results["dice"] == pytest.approx(metrics.soft_dice(truth, predicted), abs=1e-5)
    assert results["kaggle_dice"] == pytest.approx(
        metrics.kaggle_dice_mean(truth, predicted, 0.5, 4), abs=1e-5
    )
    assert results["kaggle_accuracy"] == pytest.approx(
        metrics.presence_accuracy(truth, predicted, 0.5, 4), abs=1e-5
    )


def test_metric_config_round_trip() -> None:
    for metric in nn_metrics.get_metrics(0.35, 123):
        restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
        assert type(restored) is type(metric)
        assert restored.get_config() == metric.get_config()
    assert nn_metrics.KaggleDice(0.35, 123).get_config()["min_area"] == 123


def test_metric_rejects_negative_min_area_and_sample_weight() -> None:
    with pytest.raises(ValueError, match="min_area must be >= 0; got -3"):
        nn_metrics.KaggleDice(min_area=-3)
    with pytest.raises(ValueError, match="kaggle_dice does not support sample_weight"):
        nn_metrics.KaggleDice().update_state(np.ones((1, 2, 2, 1)), np.ones((1, 2, 2, 1)), [1.0])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_near_zero_for_perfect_prediction_and_positive_otherwise(name: str) -> None:
    truth, prob = concat(random_batches(seed=3, sizes=[4]))
    loss = losses.get_loss(name)
    perfect = float(loss(truth.astype(np.float32), truth.astype(np.float32)))
    assert 0.0 <= perfect < 1e-5
    wrong = float(loss(truth.astype(np.float32), prob))
    assert np.isfinite(wrong) and wrong > 0.05
    assert np.isfinite(float(loss(np.zeros_like(prob), np.zeros_like(prob))))


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("jaccard", sm.losses.JaccardLoss()),
        ("dice", sm.losses.DiceLoss()),
        ("bce_jaccard", sm.losses.bce_jaccard_loss),
        ("bce_dice", sm.losses.bce_dice_loss),
        ("focal_dice", sm.losses.binary_focal_dice_loss),
    ],
)
def test_loss_matches_segmentation_models(name: str, reference: object) -> None:
    if KERAS3 and name == "focal_dice":
        # The same code is checked against segmentation-models 1.0.1 under tf_keras.
        pytest.skip("segmodels-keras 0.1.0.dev13's focal loss calls keras.ops.epsilon (absent)")
    truth, prob = concat(random_batches(seed=4, sizes=[3]))
    t, p = tf.constant(truth, tf.float32), tf.constant(prob)
    assert float(losses.get_loss(name)(t, p)) == pytest.approx(float(reference(t, p)), rel=1e-5)


def test_loss_accepts_float16_predictions() -> None:
    truth, prob = concat(random_batches(seed=5, sizes=[2]))
    loss = losses.get_loss("bce_jaccard")
    value16 = float(loss(truth, prob.astype(np.float16)))
    assert value16 == pytest.approx(float(loss(truth, prob)), abs=1e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("per_image", [False, True])
def test_loss_of_an_empty_batch_is_zero_not_nan(name: str, per_image: bool) -> None:
    # A replica's share of a final partial batch under MirroredStrategy can be empty.
    empty = np.zeros((0, 8, 10, 3), np.float32)
    assert float(losses.get_loss(name, per_image=per_image)(empty, empty)) == 0.0


def test_jaccard_per_image_differs_from_batch_pooling() -> None:
    truth = np.zeros((2, 2, 2, 1), np.float32)
    truth[0] = 1.0
    prob = np.full((2, 2, 2, 1), 0.5, np.float32)
    # pooled: I = 2, U = 4 + 4 - 2 = 6; per image: 1 - (2/4 + 0/2) / 2 (smooth ~ 0)
    assert float(losses.JaccardLoss()(truth, prob)) == pytest.approx(1 - 2 / 6, abs=1e-5)
    assert float(losses.JaccardLoss(per_image=True)(truth, prob)) == pytest.approx(0.75, abs=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_serialization_round_trip(name: str) -> None:
    kwargs = {"smooth": 0.5, "per_image": True}
    if name.startswith("bce"):
        kwargs["label_smoothing"] = 0.1
    loss = losses.get_loss(name, **kwargs)
    config = json.loads(json.dumps(keras.losses.serialize(loss)))
    restored = keras.losses.deserialize(config)
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    assert restored.name == name
    truth, prob = concat(random_batches(seed=6, sizes=[2]))
    assert float(restored(truth, prob)) == pytest.approx(float(loss(truth, prob)))


def test_label_smoothing_changes_bce_part_and_is_validated() -> None:
    truth, prob = concat(random_batches(seed=7, sizes=[2]))
    plain = float(losses.get_loss("bce_dice")(truth, prob))
    assert float(losses.get_loss("bce_dice", label_smoothing=0.2)(truth, prob)) != plain
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\); got 1.5"):
        losses.get_loss("bce_dice", label_smoothing=1.5)


def test_get_loss_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"loss must be one of \['bce_dice', .*\]; got 'iou'"):
        losses.get_loss("iou")


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from pipeline.nn.keras_backend import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pipeline.nn import losses
    from pipeline.nn import metrics as nn_metrics
    from pipeline.core import metrics
    from tests.unit.nn.test_losses import concat, random_batches

    truth, prob = concat(random_batches(seed=8, sizes=[9]))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        inputs = keras.Input((8, 10, 3))
        model = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
        model.compile(loss=losses.get_loss("dice"), metrics=nn_metrics.get_metrics(0.5, 4))
    data = tf.data.Dataset.from_tensor_slices((prob, truth.astype(np.float32))).batch(4)
    got = model.evaluate(data, verbose=0, return_dict=True)
    expected = {
        "dice": metrics.soft_dice(truth, prob),
        "kaggle_dice": metrics.kaggle_dice_mean(truth, prob, 0.5, 4),
        "kaggle_accuracy": metrics.presence_accuracy(truth, prob, 0.5, 4),
    }
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "got": got, "expected": expected}))
    """
)


@pytest.mark.slow
def test_keras_metrics_under_mirrored_strategy_match_numpy() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    for key, expected in report["expected"].items():
        assert report["got"][key] == pytest.approx(expected, abs=1e-5), key


def lovasz_reference(truth: np.ndarray, prob: np.ndarray, per_image: bool) -> float:
    """Berman et al.'s Lovász hinge, written out with loops (their reference code)."""
    p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    if per_image:
        rows = [
            (truth[n, ..., c], logits[n, ..., c])
            for n in range(len(truth))
            for c in range(truth.shape[-1])
        ]
    else:
        rows = [(truth[..., c], logits[..., c]) for c in range(truth.shape[-1])]
    values = []
    for gt, lg in rows:
        gt, lg = gt.ravel().astype(np.float64), lg.ravel()
        errors = 1.0 - lg * (2 * gt - 1)
        order = np.argsort(-errors, kind="stable")
        errors, gt = errors[order], gt[order]
        gts = gt.sum()
        grad = np.empty_like(gt)
        jaccard_prev = 0.0
        for i in range(len(gt)):
            inter = gts - gt[: i + 1].sum()
            union = gts + (1 - gt[: i + 1]).sum()
            jaccard = 1 - inter / union
            grad[i] = jaccard - jaccard_prev
            jaccard_prev = jaccard
        values.append(float(np.dot(np.maximum(errors, 0), grad)))
    return float(np.mean(values))


@pytest.mark.parametrize("per_image", [True, False])
def test_lovasz_hinge_matches_the_reference_and_prefers_the_better_mask(per_image: bool) -> None:
    truth, prob = concat(random_batches(seed=9, sizes=[3]))
    truth, prob = truth[:, :6, :7], prob[:, :6, :7]  # small: the reference loops per pixel
    loss = losses.get_loss("lovasz", per_image=per_image)
    got = float(loss(truth.astype(np.float32), prob))
    assert got == pytest.approx(lovasz_reference(truth, prob, per_image), rel=1e-4)
    closer = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    assert float(loss(truth.astype(np.float32), closer)) < got
    assert losses.get_loss("lovasz").per_image  # the reference's default: per image


def test_lovasz_hinge_has_finite_gradients() -> None:
    truth, prob = concat(random_batches(seed=10, sizes=[2]))
    variable = tf.Variable(prob)
    with tf.GradientTape() as tape:
        value = losses.get_loss("lovasz")(truth.astype(np.float32), variable)
    grad = tape.gradient(value, variable).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0

"""``pipeline.tune`` on hand-made experiments: OOF stores, truth CSV, cache index, classifier."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core import rle
from pipeline.core.config import DEFAULT_CONFIG, load_config
from pipeline.core.images import cache_path
from pipeline.core.layout import OOF_CLS as CLASSIFIER_OOF
from pipeline.core.layout import OOF_PRESENCE
from pipeline.core.layout import POSTPROCESS as POSTPROCESS_FILE
from pipeline.core.layout import POSTPROCESS_GRID as GRID_FILE
from pipeline.core.layout import POSTPROCESS_TABLE as TABLE_FILE
from pipeline.core.masks import truth_masks
from pipeline.core.postprocess import PostprocessParams, load_postprocess, postprocess_image
from pipeline.core.probstore import ProbReader, ProbWriter
from pipeline.core.streams import map_ahead, read_ahead
from pipeline.core.truth import decode_truth
from pipeline.run.experiment import open_experiment
from pipeline.run.json_files import write_json
from pipeline.run.oof import read_presence_table
from pipeline.run.report_data import open_run
from pipeline.run.trained_run import tuned_gate_source
from pipeline.tune import main, tune

CLASSES = ["Fish", "Sugar"]
ORIGINAL = (8, 12)
SIZE = (4, 6)
N_IMAGES = 12
IMAGE_IDS = [f"img{i:02d}.jpg" for i in range(N_IMAGES)]
POSTPROCESS = {
    "thresholds": [0.3, 0.5, 0.7],
    "min_areas": [0, 3, 6],
    "gate_thresholds": [0.25, 0.5, 0.75],
    "gates": ["none", "classifier", "segmentation"],
    "topk_fraction": 0.1,
}


def upsample(small: np.ndarray) -> np.ndarray:
    """(C, 4, 6) -> (C, 8, 12) by 2x2 blocks; the nearest resize back returns ``small``."""
    return np.kron(small, np.ones((2, 2), dtype=np.uint8))


def make_experiment(
    tmp_path: Path,
    truth: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray],
    classifier: Mapping[str, Sequence[float]] | None = None,
    classifier_folds: Sequence[int] = (0, 1, 2),
    unfinished: Sequence[int] = (),
    own_size: bool = False,
    head: bool = False,
    **postprocess: object,
) -> Path:
    """Write a 3-fold experiment by hand; returns its config file.

    ``truth``: image_id -> (C, 4, 6) uint8 at submission size (stored at 8x12);
    ``probs``: image_id -> (C, 4, 6) uint8 out-of-fold probs; ``classifier``:
    image_id -> C presence probs, written for ``classifier_folds``. ``own_size``:
    no submission size, the probs are stored upsampled to the images' 8x12. ``head``:
    ``classifier`` is a presence head's instead (``fold_K/oof_presence.csv``, with
    ``model.classification_head`` on).
    """
    rows = [
        (f"{image_id}_{name}", rle.encode(mask))
        for image_id in IMAGE_IDS
        for name, mask in zip(CLASSES, upsample(truth[image_id]), strict=True)
    ]
    pd.DataFrame(rows, columns=["Image_Label", "EncodedPixels"]).to_csv(
        tmp_path / "train.csv", index=False
    )
    images = tmp_path / "train_images"
    images.mkdir(exist_ok=True)
    for image_id in IMAGE_IDS:
        cv2.imwrite(str(images / image_id), np.zeros(ORIGINAL, dtype=np.uint8))
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "base": str(DEFAULT_CONFIG),
                "experiment": "handmade",
                "runs_dir": str(tmp_path / "runs"),
                "data": {
                    "train_csv": str(tmp_path / "train.csv"),
                    "train_images": str(images),
                    "classes": CLASSES,
                    "image_size": [16, 24],
                    "submission_size": None if own_size else list(SIZE),
                },
                "folds": {"n_splits": 3},
                "model": {"classification_head": head},
                "postprocess": {**POSTPROCESS, **postprocess},
            }
        )
    )
    config = load_config(config_path)
    exp = open_experiment(config)
    cache = cache_path(exp.cache_dir, "train", [16, 24])
    cache.mkdir(parents=True)
    pd.DataFrame({"image_id": IMAGE_IDS, "height": ORIGINAL[0], "width": ORIGINAL[1]}).to_csv(
        cache / "index.csv", index=False
    )
    for fold in range(3):
        val_ids = exp.members(fold)[1]
        with ProbWriter(config.fold_dir(fold) / "oof", CLASSES) as writer:
            for image_id in val_ids:
                q = upsample(probs[image_id]) if own_size else probs[image_id]
                writer.add(image_id, q.transpose(1, 2, 0))
        if fold not in unfinished:
            write_json(config.fold_dir(fold) / "metrics.json", {"fold": fold})
        if classifier is not None and fold in classifier_folds:
            path = (
                config.fold_dir(fold) / OOF_PRESENCE
                if head
                else config.fold_dir(fold, "classifier") / CLASSIFIER_OOF
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            frame = pd.DataFrame([[i, *classifier[i]] for i in val_ids])
            frame.columns = ["image_id", *CLASSES]
            frame.to_csv(path, index=False)
    return config_path


def block(rows: slice, cols: slice, value: int = 1) -> np.ndarray:
    out = np.zeros(SIZE, dtype=np.uint8)
    out[rows, cols] = value
    return out


def false_positive_case() -> tuple[dict, dict, dict]:
    """Fish: half the images have a mask; the others get an equally confident false
    positive of the same size, which only a perfect classifier can remove."""
    truth, probs, classifier = {}, {}, {}
    for i, image_id in enumerate(IMAGE_IDS):
        present = i % 2 == 0
        fish = block(slice(0, 2), slice(0, 3)) if present else np.zeros(SIZE, np.uint8)
        truth[image_id] = np.stack([fish, np.zeros(SIZE, np.uint8)])
        predicted = block(slice(0, 2), slice(0, 3), 230)
        probs[image_id] = np.stack([predicted, np.zeros(SIZE, np.uint8)])
        classifier[image_id] = [1.0 if present else 0.0, 0.5]
    return truth, probs, classifier


def random_case(seed: int = 3) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    truth, probs, classifier = {}, {}, {}
    for image_id in IMAGE_IDS:
        masks = []
        for _ in CLASSES:
            if rng.random() < 0.4:
                masks.append(np.zeros(SIZE, np.uint8))
            else:
                r, c = rng.integers(0, 3), rng.integers(0, 4)
                masks.append(block(slice(r, r + 2), slice(c, c + rng.integers(1, 3))))
        truth[image_id] = np.stack(masks)
        noise = rng.integers(0, 200, size=(len(CLASSES), *SIZE))
        probs[image_id] = np.clip(truth[image_id] * 120 + noise, 0, 255).astype(np.uint8)
        classifier[image_id] = rng.random(len(CLASSES)).round(3).tolist()
    return truth, probs, classifier


@pytest.mark.parametrize(
    ("original", "size"),
    [
        ((1400, 2100), (350, 525)),
        ((64, 96), (40, 60)),
        ((40, 60), (80, 120)),
        ((37, 53), (20, 29)),
        ((20, 29), (37, 53)),
        ((100, 100), (33, 250)),
        ((1, 1), (3, 4)),
        ((5, 7), (5, 7)),
    ],
)
def test_decode_truth_equals_truth_masks(original: tuple[int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(original) + sum(size))
    # Pixel noise on small images, blobs of about 7x7 pixels on large ones (quick to encode).
    step = 7 if original[0] * original[1] > 10_000 else 1
    coarse = (original[0] // step, original[1] // step)
    for trial in range(3):
        small = (rng.random((4, *coarse)) < rng.random()).astype(np.uint8)
        masks = np.stack(
            [cv2.resize(m, original[::-1], interpolation=cv2.INTER_NEAREST) for m in small]
        )
        masks[trial] = trial % 2  # an empty mask, then a full one
        rles = [rle.encode(mask) for mask in masks]
        expected = truth_masks(rles, original, size).transpose(2, 0, 1)
        got = decode_truth(rles, original, size)
        assert got.dtype == np.uint8 and got.shape == (4, *size)
        np.testing.assert_array_equal(got, expected)


def test_decode_truth_rejects_a_run_past_the_image() -> None:
    with pytest.raises(ValueError, match="runs to pixel 20, past the end of a 4x4 image"):
        decode_truth(["10 11"], (4, 4), (2, 2))


def test_writes_every_class_and_the_score_tables(tmp_path: Path) -> None:
    truth, probs, classifier = random_case()
    config = load_config(make_experiment(tmp_path, truth, probs, classifier))
    output = tune(config)
    params, extra = load_postprocess(output.postprocess_path, CLASSES)
    assert list(params) == CLASSES
    assert params == output.result.params_by_class()
    assert extra["n_images"] == N_IMAGES and extra["classifier_used"] is True
    assert extra["fold_counts"] == [4, 4, 4]
    assert extra["grid"]["thresholds"] == POSTPROCESS["thresholds"]
    assert set(extra["gates_won"]) == set(CLASSES)
    assert set(extra["gate_comparison"]["Fish"]) == {"none", "classifier", "segmentation"}
    scores = extra["scores"]
    assert scores["tuned"] >= scores["no_gate"] >= scores["plain"]
    table = pd.read_csv(config.run_dir / TABLE_FILE)
    assert table["class"].tolist() == [*CLASSES, "overall"]
    assert {"plain", "no_gate", "tuned", "fold_mean", "fold_std", "gate", "threshold"} <= set(
        table.columns
    )
    grid = pd.read_csv(config.run_dir / GRID_FILE)
    # Per class: T x A without a gate, and T x A x G for each of the two gate kinds.
    assert len(grid) == len(CLASSES) * 3 * 3 * (1 + 2 * 3)
    assert not list(config.run_dir.glob("*.tmp"))


@pytest.mark.parametrize("own_size", [False, True])
def test_chosen_settings_reproduce_the_score_by_brute_force(tmp_path: Path, own_size: bool) -> None:
    """Apply each chosen setting to every OOF image against ``masks.truth_masks``."""
    truth, probs, classifier = random_case(seed=5)
    path = make_experiment(tmp_path, truth, probs, classifier, own_size=own_size)
    config = load_config(path)
    result = tune(config).result
    rles = open_experiment(config).rles()
    for c, name in enumerate(CLASSES):
        params = result.per_class[name].params
        dice = []
        for fold in range(3):
            reader = ProbReader(config.fold_dir(fold) / "oof")
            for image_id in reader.image_ids:
                mask = params.apply(reader.get(image_id)[c], classifier[image_id][c])
                size = None if own_size else SIZE
                target = truth_masks(rles[image_id], ORIGINAL, size)[:, :, c]
                total = mask.sum() + target.sum()
                dice.append(1.0 if total == 0 else 2 * (mask & target).sum() / total)
        assert np.mean(dice) == pytest.approx(result.per_class[name].score, abs=1e-12)
        assert result.per_class[name].score >= result.per_class[name].plain_score
    assert result.score >= result.no_gate_score >= result.plain_score


def test_a_perfect_classifier_gate_wins(tmp_path: Path) -> None:
    truth, probs, classifier = false_positive_case()
    config = load_config(make_experiment(tmp_path, truth, probs, classifier))
    output = tune(config)
    fish = output.result.per_class["Fish"]
    assert fish.params.gate == "classifier"
    assert fish.score == 1.0 and fish.no_gate_score == 0.5 and fish.plain_score == 0.5
    assert fish.fold_scores == (1.0, 1.0, 1.0)
    assert output.result.per_class["Sugar"].params == PostprocessParams(0.5, 0)
    _, extra = load_postprocess(output.postprocess_path)
    assert extra["gates_won"] == {"Fish": "classifier", "Sugar": "none"}
    assert extra["gate_comparison"]["Fish"] == {
        "none": 0.5,
        "classifier": 1.0,
        "segmentation": 0.5,
    }


def test_the_presence_head_gates_like_the_classifier(tmp_path: Path) -> None:
    truth, probs, classifier = false_positive_case()
    config = load_config(make_experiment(tmp_path, truth, probs, classifier, head=True))
    output = tune(config)
    fish = output.result.per_class["Fish"]
    assert fish.params.gate == "classifier" and fish.score == 1.0 and fish.no_gate_score == 0.5
    _, extra = load_postprocess(output.postprocess_path)
    assert extra["classifier_used"] is True and extra["gate_source"] == "head"
    # A separate classifier, when trained, is the presence source instead.
    (tmp_path / "runs").rename(tmp_path / "head_runs")
    config = load_config(make_experiment(tmp_path, truth, probs, classifier))
    _, extra = load_postprocess(tune(config).postprocess_path)
    assert extra["gate_source"] == "classifier"


def test_a_head_missing_from_some_folds_names_the_retraining(tmp_path: Path) -> None:
    truth, probs, classifier = random_case()
    config = load_config(
        make_experiment(tmp_path, truth, probs, classifier, classifier_folds=(0, 2), head=True)
    )
    with pytest.raises(FileNotFoundError, match=r"fold_1/oof_presence.csv is missing") as err:
        tune(config)
    assert "foldseg train --config" in str(err.value) and "--force" in str(err.value)
    # Without the head's tables at all (e.g. trained before it was switched on): the same.
    (tmp_path / "none").mkdir()
    config = load_config(make_experiment(tmp_path / "none", truth, probs, None, head=True))
    with pytest.raises(FileNotFoundError, match=r"fold_0/oof_presence.csv is missing"):
        tune(config)


def test_min_area_wins_and_a_missing_classifier_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fish masks of 12 px are predicted exactly; empty images get a 1 px speck."""
    truth, probs = {}, {}
    for i, image_id in enumerate(IMAGE_IDS):
        fish = block(slice(0, 2), slice(0, 6)) if i % 2 else np.zeros(SIZE, np.uint8)
        speck = block(slice(3, 4), slice(5, 6))
        truth[image_id] = np.stack([fish, np.zeros(SIZE, np.uint8)])
        probs[image_id] = np.stack([fish * 230 if i % 2 else speck * 230, speck * 0])
    config = load_config(make_experiment(tmp_path, truth, probs))
    with caplog.at_level("WARNING"):
        output = tune(config)
    assert "no classifier out-of-fold probs" in caplog.text
    assert output.classifier_used is False
    assert output.result.gates == ("none", "segmentation")
    fish = output.result.per_class["Fish"]
    assert fish.params == PostprocessParams(0.5, 3)
    assert fish.score == 1.0 and fish.plain_score == 0.5


def test_an_unfinished_fold_names_the_command_that_makes_it(tmp_path: Path) -> None:
    truth, probs, _ = random_case()
    config = load_config(make_experiment(tmp_path, truth, probs, unfinished=(1,)))
    with pytest.raises(
        FileNotFoundError, match=r"fold 1 is not finished: .*fold_1/metrics.json does not exist"
    ) as err:
        tune(config)
    assert "foldseg train --config" in str(err.value)
    assert "--fold 1" in str(err.value)


def test_classifier_probs_for_some_folds_only_are_an_error(tmp_path: Path) -> None:
    truth, probs, classifier = random_case()
    config = load_config(
        make_experiment(tmp_path, truth, probs, classifier, classifier_folds=(0, 2))
    )
    with pytest.raises(
        FileNotFoundError, match=r"exist for folds \[0, 2\] but not for folds \[1\]"
    ) as err:
        tune(config)
    assert "foldseg train-classifier" in str(err.value)


def test_classifier_gate_not_searched_is_not_read(tmp_path: Path) -> None:
    truth, probs, classifier = random_case()
    path = make_experiment(
        tmp_path, truth, probs, classifier, classifier_folds=(0,), gates=["none"]
    )
    output = tune(load_config(path))
    assert output.result.gates == ("none",)
    assert all(p.gate == "none" for p in output.result.params_by_class().values())


def test_bad_classifier_files_are_errors(tmp_path: Path) -> None:
    truth, probs, classifier = random_case()
    config = load_config(make_experiment(tmp_path, truth, probs, classifier))
    path = config.fold_dir(1, "classifier") / CLASSIFIER_OOF
    frame = pd.read_csv(path)
    frame.iloc[2, 2] = 1.5
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"row 4 .*must be numbers in \[0, 1\]; got \["):
        tune(config)
    frame[CLASSES[::-1]].assign(image_id=frame["image_id"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"must have columns \['image_id', 'Fish', 'Sugar'\]"):
        tune(config)
    frame.iloc[2, 2] = 0.5
    frame.iloc[1:].to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"validation images of fold 1 .* 1 missing"):
        tune(config)


def test_a_store_with_other_images_is_an_error(tmp_path: Path) -> None:
    truth, probs, _ = random_case()
    config = load_config(make_experiment(tmp_path, truth, probs))
    other = ProbReader(config.fold_dir(1) / "oof")
    with ProbWriter(config.fold_dir(0) / "oof", CLASSES, overwrite=True) as writer:
        for image_id in other.image_ids:
            writer.add(image_id, other.get(image_id).transpose(1, 2, 0))
    with pytest.raises(ValueError, match="validation images of fold 0 .*another split"):
        tune(config)


def test_a_store_at_another_size_is_an_error(tmp_path: Path) -> None:
    truth, probs, _ = random_case()
    path = make_experiment(tmp_path, truth, probs)
    config = load_config(path, ["data.submission_size=[8, 12]"])
    with pytest.raises(ValueError, match=r"stored at 4x6; expected 8x12"):
        tune(config)


def test_only_the_classifier_gate_without_classifier_is_an_error(tmp_path: Path) -> None:
    truth, probs, _ = random_case()
    config = load_config(make_experiment(tmp_path, truth, probs, gates=["classifier"]))
    with pytest.raises(ValueError, match="leaves nothing to search"):
        tune(config)


def test_main_prints_the_table_and_returns_2_on_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth, probs, classifier = false_positive_case()
    path = make_experiment(tmp_path, truth, probs, classifier)
    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "classifier@" in out and "overall" in out and "± " in out
    assert main(["--config", str(path), "--set", "folds.n_splits=4"]) == 2


def test_read_ahead_keeps_order_and_raises_producer_errors() -> None:
    assert list(read_ahead(iter(range(100)), 3)) == list(range(100))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        list(read_ahead(failing(), 2))
    before = threading.active_count()
    stream = read_ahead(iter(range(1000)), 2)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="depth must be >= 1; got 0"):
        next(read_ahead(iter([]), 0))


def test_tune_does_not_import_tensorflow() -> None:
    code = (
        "import sys, pipeline.tune\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tf_keras', 'keras', 'segmentation_models')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_image_missing_from_the_cache_index_is_an_error(tmp_path: Path) -> None:
    truth, probs, _ = random_case()
    config = load_config(make_experiment(tmp_path, truth, probs))
    index = cache_path(config.run_dir / "cache", "train", [16, 24]) / "index.csv"
    frame = pd.read_csv(index)
    frame[frame["image_id"] != "img05.jpg"].to_csv(index, index=False)
    with pytest.raises(ValueError, match="'img05.jpg' of .* has no original size"):
        tune(config)


def test_map_ahead_keeps_order_bounds_work_in_flight_and_raises_in_place() -> None:
    def slow_square(x: int) -> int:
        return x * x

    assert list(map_ahead(slow_square, iter(range(200)), 3, 5)) == [x * x for x in range(200)]
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for x in range(1000):
            pulled.append(x)
            yield x

    stream = map_ahead(slow_square, source(), 2, 4)
    assert [next(stream) for _ in range(3)] == [0, 1, 4]
    assert len(pulled) <= 3 + 4  # never more than `depth` items ahead of the consumer
    stream.close()

    def fails_at_7(x: int) -> int:
        if x == 7:
            raise ValueError("bad item 7")
        return x

    seen = []
    with pytest.raises(ValueError, match="bad item 7"):
        for x in map_ahead(fails_at_7, iter(range(20)), 2, 3):
            seen.append(x)
    assert seen == list(range(7))
    with pytest.raises(ValueError, match="workers and depth must be >= 1"):
        next(map_ahead(slow_square, iter([]), 0, 1))


def test_mask_table_cache_is_reused_and_follows_the_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.run import experiment

    truth, probs, classifier = false_positive_case()
    config = load_config(make_experiment(tmp_path, truth, probs, classifier))
    caches = list((tmp_path / "runs" / "handmade" / "cache" / "masks").glob("table-*.json"))
    assert len(caches) == 1  # written by the first open
    reads: list[Path] = []
    real_read = experiment.read_masks

    def counting_read(path: Path, **kwargs: object) -> object:
        reads.append(Path(path))
        return real_read(path, **kwargs)

    monkeypatch.setattr(experiment, "read_masks", counting_read)
    first = open_experiment(config)
    assert reads == []  # served from the cache
    pd.testing.assert_frame_equal(first.table, real_read(config.data.train_csv).table)

    # An edited CSV (new size and time) is read and validated again.
    csv = Path(config.data.train_csv)
    frame = pd.read_csv(csv, keep_default_na=False)
    frame.loc[0, "EncodedPixels"] = "1 2"
    frame.to_csv(csv, index=False)
    edited = open_experiment(config)
    assert len(reads) == 1
    assert edited.table["rle"].iloc[0] == "1 2"
    assert len(list(caches[0].parent.glob("table-*.json"))) == 1  # the stale one is gone

    # A malformed RLE is still caught after a cached read, naming the row.
    frame.loc[1, "EncodedPixels"] = "5 1 2 1"
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="row 3"):
        open_experiment(config)

    # A damaged cache file is ignored and rewritten.
    frame.loc[1, "EncodedPixels"] = ""
    frame.to_csv(csv, index=False)
    open_experiment(config)
    (cache,) = caches[0].parent.glob("table-*.json")
    cache.write_bytes(b"not json")
    reads.clear()
    assert open_experiment(config).table.equals(edited.table.assign(rle=frame_rles(frame)))
    assert len(reads) == 1


def frame_rles(frame: pd.DataFrame) -> list[str]:
    """The EncodedPixels column in the canonical table's order (image, then class)."""
    return frame["EncodedPixels"].tolist()


def test_component_sizes_are_searched_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fish masks come with a 1 px speck on every image: only component removal is exact."""
    truth, probs = {}, {}
    for i, image_id in enumerate(IMAGE_IDS):
        fish = block(slice(0, 2), slice(0, 6)) if i % 2 else np.zeros(SIZE, np.uint8)
        speck = block(slice(3, 4), slice(5, 6))
        truth[image_id] = np.stack([fish, np.zeros(SIZE, np.uint8)])
        probs[image_id] = np.stack([(fish | speck) * 230, speck * 0])
    path = make_experiment(tmp_path, truth, probs)
    assert main(["--config", str(path), "--set", "postprocess.min_components=[0,2]"]) == 0
    out = capsys.readouterr().out
    assert "min_comp" in out
    config = load_config(path)
    params, extra = load_postprocess(config.run_dir / POSTPROCESS_FILE, CLASSES)
    assert params["Fish"].min_component == 2 and params["Sugar"].min_component == 0
    assert extra["grid"]["min_components"] == [0, 2]
    assert extra["per_class"]["Fish"]["tuned"] == 1.0
    grid = pd.read_csv(config.run_dir / GRID_FILE)
    assert sorted(grid["min_component"].unique()) == [0, 2]
    assert main(["--config", str(path), "--set", "postprocess.min_components=[0,-3]"]) == 2
    err = capsys.readouterr().err
    assert "'postprocess.min_components' must be a non-empty list of integers >= 0" in err


def _brute_force_scores(
    config_path: Path, result: object, classifier: Mapping[str, Sequence[float]], rule: bool
) -> tuple[float, float]:
    """(in-sample, nested) mean Kaggle Dice of ``postprocess_image`` over every OOF image."""
    config = load_config(config_path)
    rles = open_experiment(config).rles()
    in_sample, nested = [], []
    for fold in range(3):
        reader = ProbReader(config.fold_dir(fold) / "oof")
        chosen = [result.per_class[name].params for name in CLASSES]  # type: ignore[attr-defined]
        held_out = [result.per_class[name].nested_params[fold] for name in CLASSES]  # type: ignore[attr-defined]
        for image_id in reader.image_ids:
            q = np.asarray(reader.get(image_id))
            target = truth_masks(rles[image_id], ORIGINAL, SIZE).transpose(2, 0, 1)
            for settings, out in ((chosen, in_sample), (held_out, nested)):
                masks = postprocess_image(q, settings, classifier[image_id], rule)
                for m, t in zip(masks, target, strict=True):
                    total = m.sum() + t.sum()
                    out.append(1.0 if total == 0 else 2 * (m & t).sum() / total)
    return float(np.mean(in_sample)), float(np.mean(nested))


def test_at_least_one_rule_is_scored_in_sample_and_nested_by_brute_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth, probs, classifier = random_case(seed=7)
    for image_id in IMAGE_IDS:  # every image has a class, so "auto" turns the rule on
        if not truth[image_id].any():
            truth[image_id][0] = block(slice(0, 2), slice(0, 2))
    # Large minimum areas leave some images with no mask at all.
    path = make_experiment(
        tmp_path, truth, probs, classifier, min_areas=[0, 6, 12], at_least_one="auto"
    )
    assert main(["--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "at least one class per image (auto): nested" in printed
    _, extra = load_postprocess(load_config(path).run_dir / POSTPROCESS_FILE, CLASSES)
    rule = extra["at_least_one"]
    assert rule["applied"] is True and rule["every_training_image_has_a_class"] is True
    result = tune(load_config(path)).result
    without = _brute_force_scores(path, result, classifier, rule=False)
    with_rule = _brute_force_scores(path, result, classifier, rule=True)
    assert rule["in_sample"]["without"] == pytest.approx(without[0], abs=1e-12)
    assert rule["nested"]["without"] == pytest.approx(without[1], abs=1e-12)
    assert rule["in_sample"]["with"] == pytest.approx(with_rule[0], abs=1e-12)
    assert rule["nested"]["with"] == pytest.approx(with_rule[1], abs=1e-12)
    assert rule["images_changed"]["in_sample"] + rule["images_changed"]["nested"] > 0
    # predict reads the scores with the rule, since it applies it.
    assert extra["scores"]["tuned"] == pytest.approx(with_rule[0], abs=1e-12)
    assert extra["scores"]["tuned_nested"] == pytest.approx(with_rule[1], abs=1e-12)


def test_at_least_one_auto_stays_off_where_a_training_image_has_no_class(tmp_path: Path) -> None:
    truth, probs, classifier = false_positive_case()  # half the images have no Fish, no Sugar
    path = make_experiment(tmp_path, truth, probs, classifier, at_least_one="auto")
    output = tune(load_config(path))
    _, extra = load_postprocess(output.postprocess_path, CLASSES)
    assert extra["at_least_one"] == {
        "choice": "auto",
        "every_training_image_has_a_class": False,
        "applied": False,
    }
    assert extra["scores"]["tuned"] == output.result.score


def _fold_dice_sums(
    config_path: Path, settings: list, classifier: Mapping[str, Sequence[float]], rule: bool
) -> list[float]:
    """Per fold, the summed Kaggle Dice of its images' classes under ``settings``."""
    config = load_config(config_path)
    rles = open_experiment(config).rles()
    sums = []
    for fold in range(3):
        reader = ProbReader(config.fold_dir(fold) / "oof")
        total = 0.0
        for image_id in reader.image_ids:
            q = np.asarray(reader.get(image_id))
            target = truth_masks(rles[image_id], ORIGINAL, SIZE).transpose(2, 0, 1)
            masks = postprocess_image(q, settings, classifier[image_id], rule)
            for m, t in zip(masks, target, strict=True):
                both = m.sum() + t.sum()
                total += 1.0 if both == 0 else 2 * (m & t).sum() / both
        sums.append(total)
    return sums


def rescued_case() -> tuple[dict, dict, dict]:
    """Every image has one class; its false positive in the other class is as small as
    a third of the true masks, so the tuned minimum area empties those images, which
    the rule rescues (the true class has the higher probabilities)."""
    truth, probs, classifier = {}, {}, {}
    for i, image_id in enumerate(IMAGE_IDS):
        small = i % 3 == 0
        true_block = block(slice(0, 2), slice(0, 3)) if small else block(slice(0, 3), slice(0, 4))
        false_block = block(slice(2, 4), slice(3, 6))
        pair = [true_block, np.zeros(SIZE, np.uint8)]
        guess = [true_block * 240, false_block * 200]
        order = slice(None) if i % 2 == 0 else slice(None, None, -1)
        truth[image_id] = np.stack(pair[order]).astype(np.uint8)
        probs[image_id] = np.stack(guess[order]).astype(np.uint8)
        classifier[image_id] = [0.5, 0.5]
    return truth, probs, classifier


@pytest.mark.parametrize("case", ["random7", "random8", "rescued"])
def test_a_searched_rule_decides_each_fold_on_the_other_folds(tmp_path: Path, case: str) -> None:
    truth, probs, classifier = rescued_case() if case == "rescued" else random_case(int(case[-1]))
    path = make_experiment(
        tmp_path, truth, probs, classifier, min_areas=[0, 6, 12], at_least_one="search"
    )
    output = tune(load_config(path))
    result = output.result
    _, extra = load_postprocess(output.postprocess_path, CLASSES)
    rule = extra["at_least_one"]
    pairs = N_IMAGES * len(CLASSES)
    nested_total = 0.0
    decisions = []
    for k in range(3):
        settings = [result.per_class[name].nested_params[k] for name in CLASSES]
        on = _fold_dice_sums(path, settings, classifier, True)
        off = _fold_dice_sums(path, settings, classifier, False)
        decide = sum(on[j] - off[j] for j in range(3) if j != k) > 0
        decisions.append(decide)
        nested_total += on[k] if decide else off[k]
    assert rule["fold_decisions"] == decisions
    assert rule["nested"]["searched"] == pytest.approx(nested_total / pairs, abs=1e-12)
    assert extra["scores"]["tuned_nested"] == pytest.approx(nested_total / pairs, abs=1e-12)
    chosen = [result.per_class[name].params for name in CLASSES]
    gain = sum(_fold_dice_sums(path, chosen, classifier, True)) - sum(
        _fold_dice_sums(path, chosen, classifier, False)
    )
    assert rule["applied"] is bool(gain > 0)
    if case == "rescued":
        assert rule["applied"] and all(decisions)
    expected = result.score + (gain / pairs if gain > 0 else 0.0)
    assert extra["scores"]["tuned"] == pytest.approx(expected, abs=1e-12)
    assert output.oof_scores() == pytest.approx((expected, nested_total / pairs), abs=1e-12)
    # Per class too: the overall figures are the mean of the classes'.
    per_class = [extra["per_class"][name] for name in CLASSES]
    assert np.mean([p["tuned"] for p in per_class]) == pytest.approx(expected, abs=1e-12)
    assert np.mean([p["tuned_nested"] for p in per_class]) == pytest.approx(
        nested_total / pairs, abs=1e-12
    )


def test_the_tuned_gate_source_is_what_predict_evaluate_and_pseudo_label_follow(
    tmp_path: Path,
) -> None:
    truth, probs, classifier = false_positive_case()
    path = make_experiment(tmp_path, truth, probs, classifier, head=True)
    config = load_config(path)
    assert tuned_gate_source(config) is None  # nothing tuned yet
    tune(config)
    assert tuned_gate_source(config) == "head"
    # The same run read with a config whose model has no head: refused, named.
    without = load_config(path, ["model.classification_head=false"])
    with pytest.raises(ValueError, match="gates \\['Fish'\\] with the presence head"):
        tuned_gate_source(without)
    with pytest.raises(ValueError, match="model.classification_head is false"):
        open_run(without)
    # No class gated: no source to follow.
    ungated = load_config(path, ["postprocess.gates=[none]"])
    tune(ungated)
    assert tuned_gate_source(ungated) is None and tuned_gate_source(without) is None


def test_presence_tables_are_checked_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "test_presence.csv"
    path.write_text("image_id,Fish,Sugar\na,0.5,0.25\nb,1,0\n")
    frame = read_presence_table(path, ["Fish", "Sugar"])
    assert frame["Fish"].tolist() == [0.5, 1.0] and frame["Sugar"].dtype == np.float64
    path.write_text("image_id,Fish,Sugar\na,0.5,0.25\nb,1.5,0\n")
    with pytest.raises(ValueError, match=r"row 3 \(image_id 'b'\).*in \[0, 1\]"):
        read_presence_table(path, ["Fish", "Sugar"])
    path.write_text("image_id,Fish,Sugar\na,0.5,0.25\na,1,0\n")
    with pytest.raises(ValueError, match="image_id 'a' appears more than once"):
        read_presence_table(path, ["Fish", "Sugar"])
    with pytest.raises(ValueError, match=r"must have columns \['image_id', 'Sugar', 'Fish'\]"):
        read_presence_table(path, ["Sugar", "Fish"])

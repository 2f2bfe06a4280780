"""The report's metric tables, energy estimate, statistics and documents on hand-made data."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.core import dataset_stats, energy, metrics, report, report_figures, report_scores
from pipeline.core.postprocess import PostprocessParams

ENERGY = {"cpu_watts": 65.0, "gpu_watts": 300.0, "pue": 1.2, "grid_g_co2_per_kwh": 400.0}


def masks(*rows: str) -> np.ndarray:
    """A (C, 2, 3) stack from one string of six 0/1 characters per class."""
    return np.array([np.array(list(r), dtype=np.uint8).reshape(2, 3) for r in rows])


@pytest.fixture
def counts() -> pd.DataFrame:
    """Two classes, two folds: fold 0 has images a and b, fold 1 has image c."""
    acc = report_scores.ScoreAccumulator(["A", "B"], n_folds=2, stages=["plain"])
    # a: A truth 2 px, pred 1 px inside it (Dice 2/3, TP); B empty and empty (Dice 1, TN).
    dice_a = acc.add("plain", 0, masks("110000", "000000"), masks("100000", "000000"))
    # b: A empty truth, 1 px predicted (Dice 0, FP); B truth 6 px, pred 3 inside (2/3, TP).
    acc.add("plain", 0, masks("000000", "111111"), masks("001000", "111000"))
    # c: A truth 2 px, nothing predicted (Dice 0, FN); B 1 px exactly right (1, TP).
    acc.add("plain", 1, masks("000110", "000001"), masks("000000", "000001"))
    np.testing.assert_allclose(dice_a, [2 / 3, 1.0])
    return acc.counts()


def row(table: pd.DataFrame, **where: object) -> pd.Series:
    selected = table
    for key, value in where.items():
        selected = selected[selected[key] == value]
    assert len(selected) == 1, where
    return selected.iloc[0]


def test_per_fold_scores_are_the_hand_computed_ones(counts):
    table = report_scores.score_table(counts)
    assert table[["fold", "class"]].values.tolist() == [
        [0, "A"],
        [0, "B"],
        [0, "all"],
        [1, "A"],
        [1, "B"],
        [1, "all"],
    ]
    a0 = row(table, fold=0, **{"class": "A"})
    assert a0["kaggle_dice"] == pytest.approx(1 / 3)  # (2/3 + 0) / 2
    assert a0["dice"] == pytest.approx(0.5)  # 2 * 1 / (2 + 2): pixels summed over a and b
    assert a0["iou"] == pytest.approx(1 / 3)  # 1 / (2 + 2 - 1)
    assert (a0["tp"], a0["fp"], a0["fn"], a0["tn"]) == (1, 1, 0, 0)
    assert (a0["accuracy"], a0["sensitivity"], a0["specificity"]) == (0.5, 1.0, 0.0)
    assert (a0["precision"], a0["f1"]) == (0.5, pytest.approx(2 / 3))
    b0 = row(table, fold=0, **{"class": "B"})
    assert b0["kaggle_dice"] == pytest.approx(5 / 6)
    assert (b0["dice"], b0["iou"]) == (pytest.approx(2 / 3), 0.5)
    assert (b0["tp"], b0["fp"], b0["fn"], b0["tn"]) == (1, 0, 0, 1)
    a1 = row(table, fold=1, **{"class": "A"})
    assert (a1["kaggle_dice"], a1["dice"], a1["iou"], a1["sensitivity"], a1["f1"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert np.isnan(a1["specificity"]) and np.isnan(a1["precision"])  # 0 / 0: undefined
    all0 = row(table, fold=0, **{"class": "all"})
    assert all0["n_images"] == 4  # image-class pairs
    assert all0["kaggle_dice"] == pytest.approx(7 / 12)
    assert (all0["dice"], all0["iou"]) == (pytest.approx(8 / 13), pytest.approx(4 / 9))
    assert (all0["tp"], all0["fp"], all0["fn"], all0["tn"], all0["accuracy"]) == (2, 1, 0, 1, 0.75)


def test_pooled_scores_sum_the_folds_before_dividing(counts):
    pooled = report_scores.score_table(counts, pooled=True)
    assert "fold" not in pooled.columns
    a = row(pooled, **{"class": "A"})
    assert a["n_images"] == 3
    assert a["kaggle_dice"] == pytest.approx(2 / 9)
    assert (a["dice"], a["iou"]) == (pytest.approx(1 / 3), pytest.approx(1 / 5))
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (1, 1, 1, 0)


def test_mean_and_std_across_folds(counts):
    summary = report_scores.summarise_folds(report_scores.score_table(counts))
    a = row(summary, **{"class": "A"})
    assert a["n_folds"] == 2
    assert (a["kaggle_dice_mean"], a["kaggle_dice_std"]) == (pytest.approx(1 / 6),) * 2
    assert (a["dice_mean"], a["dice_std"]) == (0.25, 0.25)
    # Fold 1's specificity is undefined: the mean and std are those of fold 0 alone.
    assert (a["specificity_mean"], a["specificity_std"]) == (0.0, 0.0)
    b = row(summary, **{"class": "B"})
    assert b["kaggle_dice_mean"] == pytest.approx((5 / 6 + 1) / 2)
    assert b["kaggle_dice_std"] == pytest.approx((1 - 5 / 6) / 2)


def test_scores_agree_with_the_metric_module():
    rng = np.random.default_rng(3)
    truth = (rng.random((12, 5, 7, 3)) < 0.3).astype(np.uint8)
    truth[:4, :, :, 1] = 0  # some empty truths
    prob = rng.random(truth.shape).astype(np.float32)
    pred = (prob > 0.5).astype(np.uint8)
    pred[4:7, :, :, 2] = 0  # some empty predictions
    acc = report_scores.ScoreAccumulator(["x", "y", "z"], 1, ["s"])
    for t, p in zip(truth, pred, strict=True):
        acc.add("s", 0, t.transpose(2, 0, 1), p.transpose(2, 0, 1))
    table = report_scores.score_table(acc.counts())
    expected = metrics.kaggle_dice(truth, pred.astype(np.float32), threshold=0.5)
    for c, name in enumerate("xyz"):
        r = row(table, **{"class": name})
        assert r["kaggle_dice"] == pytest.approx(expected[:, c].mean())
        assert r["dice"] == pytest.approx(metrics.dice(truth[..., c], pred[..., c]))
        assert r["iou"] == pytest.approx(metrics.iou(truth[..., c], pred[..., c]))
        confusion = metrics.presence_confusion(
            truth[..., c].any(axis=(1, 2)), pred[..., c].any(axis=(1, 2))
        )
        for key, value in confusion.items():
            assert r[key] == pytest.approx(value, nan_ok=True), key


def test_empty_truth_and_prediction_everywhere_score_one():
    acc = report_scores.ScoreAccumulator(["A"], 1, ["s"])
    acc.add("s", 0, masks("000000"), masks("000000"))
    r = report_scores.score_table(acc.counts()).iloc[0]
    assert (r["kaggle_dice"], r["dice"], r["iou"], r["specificity"]) == (1.0, 1.0, 1.0, 1.0)
    assert np.isnan(r["sensitivity"]) and np.isnan(r["precision"]) and np.isnan(r["f1"])


def test_stages_stay_apart_and_in_order():
    acc = report_scores.ScoreAccumulator(["A"], 1, ["plain", "tuned"])
    acc.add("tuned", 0, masks("110000"), masks("110000"))
    acc.add("plain", 0, masks("110000"), masks("000000"))
    table = report_scores.score_table(acc.counts())
    assert table["stage"].tolist() == ["plain", "plain", "tuned", "tuned"]
    assert table["kaggle_dice"].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_accumulator_rejects_bad_input():
    acc = report_scores.ScoreAccumulator(["A", "B"], 2, ["plain"])
    with pytest.raises(ValueError, match="stage must be one of"):
        acc.add("gated", 0, masks("0" * 6, "0" * 6), masks("0" * 6, "0" * 6))
    with pytest.raises(ValueError, match=r"fold must be in \[0, 1\]; got 2"):
        acc.add("plain", 2, masks("0" * 6, "0" * 6), masks("0" * 6, "0" * 6))
    with pytest.raises(ValueError, match=r"must both be \(2, H, W\)"):
        acc.add("plain", 0, masks("0" * 6), masks("0" * 6))
    with pytest.raises(ValueError, match="n_folds >= 1"):
        report_scores.ScoreAccumulator(["A"], 0, ["plain"])


def test_predict_masks_applies_each_class_setting():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (2, 6, 8), dtype=np.uint8)
    params = [
        PostprocessParams(0.5, 0),
        PostprocessParams(0.3, 5, gate="classifier", gate_threshold=0.6),
    ]
    out = report_scores.predict_masks(q, params, np.array([0.9, 0.2]))
    assert out.dtype == np.uint8 and out.shape == q.shape
    np.testing.assert_array_equal(out[0], params[0].apply(q[0]))
    assert not out[1].any()  # gated out: 0.2 < 0.6
    np.testing.assert_array_equal(
        report_scores.predict_masks(q, params, np.array([0.9, 0.7]))[1], params[1].apply(q[1], 0.7)
    )
    with pytest.raises(ValueError, match=r"q must be uint8 \(2, H, W\)"):
        report_scores.predict_masks(q[:1], params, None)


def test_worst_images_keeps_the_lowest_scores():
    worst = report_scores.WorstImages(2)
    for score, image_id in [(0.5, "a"), (0.9, "b"), (0.1, "c"), (0.5, "d"), (0.7, "e")]:
        worst.add(score, image_id, payload=image_id.upper())
    assert worst.items() == [(0.1, "c", "C"), (0.5, "a", "A")]  # the earlier 0.5 stays
    empty = report_scores.WorstImages(0)
    empty.add(0.0, "x")
    assert empty.items() == []
    with pytest.raises(ValueError, match="k must be >= 0; got -1"):
        report_scores.WorstImages(-1)


def test_presence_auc_by_hand():
    truth = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], dtype=float)
    probs = np.array([[0.9, 0.5], [0.1, 0.5], [0.4, 0.5], [0.6, 0.5]])
    auc = report_scores.presence_auc(truth, probs, ["A", "B"])
    assert auc["A"] == 0.75  # 3 of the 4 (positive, negative) pairs are ordered right
    assert np.isnan(auc["B"])  # one label only
    with pytest.raises(ValueError, match=r"must both be \(N, 3\)"):
        report_scores.presence_auc(truth, probs, ["A", "B", "C"])


def test_energy_estimate_arithmetic():
    cpu = energy.estimate_energy(3600, "CPU", ENERGY)
    assert cpu["hardware"] == "cpu" and cpu["n_gpus"] == 0 and cpu["watts"] == 65.0
    assert cpu["kwh"] == pytest.approx(1.0 * 0.065 * 1.2)
    assert cpu["g_co2e"] == pytest.approx(0.078 * 400)
    gpus = energy.estimate_energy(1800, "2 x NVIDIA H100 80GB HBM3", ENERGY)
    assert (gpus["hardware"], gpus["n_gpus"], gpus["watts"]) == ("gpu", 2, 600.0)
    assert gpus["kwh"] == pytest.approx(0.5 * 0.6 * 1.2)
    assert gpus["g_co2e"] == pytest.approx(0.36 * 400)
    assert energy.estimate_energy(10, "/GPU:0", ENERGY)["n_gpus"] == 1
    assert energy.estimate_energy(0, "CPU", ENERGY)["kwh"] == 0.0


def test_energy_estimate_errors():
    with pytest.raises(ValueError, match="device must be 'CPU' or '<n> x <GPU name>'"):
        energy.estimate_energy(10, "TPU v3", ENERGY)
    with pytest.raises(ValueError, match="seconds must be a finite number >= 0; got -1"):
        energy.estimate_energy(-1, "CPU", ENERGY)
    with pytest.raises(ValueError, match="energy.pue must be >= 0"):
        energy.estimate_energy(1, "CPU", {**ENERGY, "pue": -1})


def test_energy_table_totals_the_runs_it_can_read():
    runs = [
        {"run": "segmentation fold 0", "seconds": 3600.0, "device": "CPU"},
        {"run": "prediction", "seconds": 1800.0, "device": "2 x A100"},
        {"run": "odd", "seconds": 10.0, "device": "abacus"},
    ]
    table = energy.energy_table(runs, ENERGY)
    assert table["run"].tolist() == ["segmentation fold 0", "prediction", "odd", "total"]
    assert table.iloc[2]["hardware"] == "unknown" and np.isnan(table.iloc[2]["kwh"])
    total = table.iloc[-1]
    assert total["seconds"] == 5400.0  # the unreadable run is not counted
    assert total["kwh"] == pytest.approx(0.078 + 0.36)
    assert total["g_co2e"] == pytest.approx((0.078 + 0.36) * 400)


def test_energy_table_of_no_runs_is_a_zero_total():
    table = energy.energy_table([], ENERGY)
    assert table["run"].tolist() == ["total"]
    assert (table.iloc[0]["seconds"], table.iloc[0]["kwh"], table.iloc[0]["g_co2e"]) == (0, 0, 0)


def test_overlay_blends_class_colours():
    image = np.zeros((2, 2, 3), np.uint8)
    mask = np.zeros((2, 2, 2), np.uint8)
    mask[0, 0, 0] = 1
    mask[1, 1, 1] = 1
    out = report_figures.overlay(image, mask, alpha=0.5)
    colors = report_figures.class_colors(2).astype(np.float32)
    np.testing.assert_array_equal(out[0, 0], np.rint(0.5 * colors[0]).astype(np.uint8))
    np.testing.assert_array_equal(out[1, 1], np.rint(0.5 * colors[1]).astype(np.uint8))
    assert not out[0, 1].any() and not out[1, 0].any()
    with pytest.raises(ValueError, match="must share H, W"):
        report_figures.overlay(image, np.zeros((3, 2, 1), np.uint8))


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "b", "c", "c"],
            "class_name": ["X", "Y"] * 3,
            "rle": ["1 3 10 2", "5 4", "", "2 10", "", ""],
        }
    )


def test_class_statistics(table):
    stats = dataset_stats.class_statistics(table, ["X", "Y"]).set_index("class")
    assert stats.loc["X", "images"] == 3 and stats.loc["X", "present"] == 1
    assert stats.loc["X", "frequency"] == pytest.approx(1 / 3)
    assert stats.loc["Y", "empty_rate"] == pytest.approx(1 / 3)
    assert stats.loc["X", "area_mean"] == 5.0  # 3 + 2 pixels
    assert (stats.loc["Y", "area_min"], stats.loc["Y", "area_max"]) == (4.0, 10.0)
    assert stats.loc["Y", "area_median"] == 7.0
    areas = dataset_stats.mask_areas(table)
    assert areas.values.tolist() == [["a", "X", 5], ["a", "Y", 4], ["b", "Y", 10]]


def test_co_occurrence(table):
    both = dataset_stats.co_occurrence(table, ["X", "Y"])
    assert both.values.tolist() == [[1, 1], [1, 2]]


def test_stage_and_spread_tables(counts):
    summary = report_scores.summarise_folds(report_scores.score_table(counts))
    pooled = report_scores.score_table(counts, pooled=True)
    stages = report.stage_table(summary, pooled, "kaggle_dice")
    assert stages.columns.tolist() == ["class", "plain (folds)", "plain (pooled)"]
    assert stages["plain (folds)"].tolist()[0] == "0.1667 ± 0.1667"
    assert stages["plain (pooled)"].tolist()[0] == pytest.approx(2 / 9)
    spread = report.spread_table(summary, "plain")
    assert spread.loc[0, "dice"] == "0.2500 ± 0.2500"
    assert report.mean_std(float("nan"), 0.0) == "n/a"
    assert [report.format_value(v) for v in (0.0, 1e-17, 0.00004, 0.00006, 3, "x")] == [
        "0.0000",
        "1.0e-17",
        "4.0e-05",
        "0.0001",
        "3",
        "x",
    ]


def test_json_ready_makes_strict_json():
    value = {"a": np.float64("nan"), "b": [np.int64(3), (np.inf, 1.5)], 4: {"c": np.bool_(True)}}
    assert report.json_ready(value) == {"a": None, "b": [3, [None, 1.5]], "4": {"c": True}}


def test_documents_hold_tables_and_images(tmp_path):
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG fake bytes")
    section = report.Section(
        "Scores <1>",
        paragraphs=["a & b"],
        tables=[("caption", pd.DataFrame({"class": ["A"], "dice": [0.123456], "x": [np.nan]}))],
        images=[("the plot", png)],
    )
    md = report.render_markdown("Title", [section])
    assert "## Scores <1>" in md
    assert "| class | dice | x |" in md and "| A | 0.1235 | n/a |" in md
    assert "![the plot](plot.png)" in md
    page = report.render_html("Title", [section])
    assert "Scores &lt;1&gt;" in page and "<p>a &amp; b</p>" in page
    assert base64.b64encode(png.read_bytes()).decode() in page
    assert "<td>0.1235</td>" in page


def test_figures_are_written(tmp_path, counts):
    summary = report_scores.summarise_folds(report_scores.score_table(counts))
    pooled = report_scores.score_table(counts, pooled=True)
    history = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [1.1, 0.7]})
    figures = {
        "bars": report_figures.figure_stage_bars(summary, ["plain"]),
        "confusion": report_figures.figure_confusions(pooled, ["plain"]),
        "curves": report_figures.figure_fold_histories({"fold 0": history, "fold 1": history}),
    }
    for name, figure in figures.items():
        path = report_figures.save_figure(figure, tmp_path / f"{name}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "confusion.png", "curves.png"]


def test_figures_leave_the_global_matplotlib_state_alone(tmp_path):
    """Importing, drawing and saving choose no backend and register no pyplot figure."""
    code = (
        "import sys, matplotlib, pandas as pd\n"
        "from pipeline.core import curves, dataset_stats, report_figures\n"
        "history = pd.DataFrame({'epoch': [1, 2], 'loss': [1.0, 0.5], 'lr': [1e-3, 1e-4]})\n"
        f"curves.plot_history(history, {str(tmp_path / 'curves.png')!r})\n"
        "figure = report_figures.figure_counts(pd.DataFrame([[1, 2], [3, 4]]), 'counts')\n"
        f"report_figures.save_figure(figure, {str(tmp_path / 'counts.png')!r})\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["svg", "False"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.png", "curves.png"]

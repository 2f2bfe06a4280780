"""The range test's maths (smoothing, divergence, suggestion) and the grid's tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import ConfigError, load_config
from pipeline.core.grid_tables import (
    GridRun,
    compare_top_two,
    expand_grid,
    experiment_name,
    format_value,
    grid_seeds,
    make_results_table,
    parse_folds,
    parse_grid_spec,
    sanitise_name,
    summarise_grid,
)
from pipeline.core.lr_range import (
    RULE_MIN_OVER_10,
    ema_lag_decades,
    exponential_lrs,
    find_divergence,
    lr_find_path,
    range_test_frame,
    resolve_lr,
    smooth_losses,
    suggest_lr,
)


@pytest.fixture(scope="module")
def base():
    return load_config(None, ["experiment=demo", "seed=10"])


def synthetic_curve(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat at 1, falls steeply around lr=1e-3, minimum near 1e-2, then diverges."""
    lrs = exponential_lrs(1e-7, 1.0, 200)
    x = np.log10(lrs)
    clean = 1 - 0.6 / (1 + np.exp(-(x + 3) / 0.25)) + 0.5 * np.expm1(np.clip((x + 2) * 3, 0, None))
    noisy = clean + np.random.default_rng(seed).normal(0, 0.02, x.size)
    return lrs, clean, noisy


# ---- range test ------------------------------------------------------------------------


def test_exponential_lrs_are_geometric_from_start_to_end():
    lrs = exponential_lrs(1e-6, 1e-2, 5)
    np.testing.assert_allclose(lrs, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    with pytest.raises(ValueError, match=r"0 < start_lr < end_lr; got 0.1 and 0.01"):
        exponential_lrs(0.1, 0.01, 10)
    with pytest.raises(ValueError, match=r"lr_find.steps must be an integer >= 2; got 1"):
        exponential_lrs(1e-6, 1.0, 1)


def test_smoothing_is_bias_corrected():
    np.testing.assert_allclose(smooth_losses([0.7] * 50, 0.98), 0.7)  # no ramp up from 0
    # (0.5 * 1 + 2) / (1 + 0.5): the EMA over its weights.
    np.testing.assert_allclose(smooth_losses([1.0, 2.0], 0.5), [1.0, 5 / 3])
    np.testing.assert_allclose(smooth_losses([3.0, 1.0, 2.0], 0.0), [3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"lr_find.smoothing must be in \[0, 1\); got 1"):
        smooth_losses([1.0], 1)


def test_divergence_at_factor_times_the_running_minimum():
    # running minimum 0.4 from index 2: 1.7 is not above 4 x 0.4, 1.61 is.
    assert find_divergence([1.0, 0.5, 0.4, 1.6, 1.61, 0.1], 0.0, 4.0) == 4
    assert find_divergence([1.0, 0.9, 0.8], 0.0, 4.0) is None
    assert find_divergence([1.0, 0.9, math.nan, 0.8], 0.9, 4.0) == 2
    assert find_divergence([1.0, math.inf], 0.9, 4.0) == 1
    with pytest.raises(ValueError, match=r"diverge_factor must be > 1; got 1"):
        find_divergence([1.0], 0.9, 1)


def test_synthetic_curve_stops_after_the_minimum_and_suggests_the_steep_region():
    lrs, clean, _ = synthetic_curve(0)
    slope = np.gradient(clean, np.log10(lrs))
    steep_region = lrs[slope <= slope.min() / 3]  # about 3e-4 .. 4e-3
    for seed in range(3):
        _, _, noisy = synthetic_curve(seed)
        stop = find_divergence(noisy, 0.98, 4.0)
        assert stop is not None and 1e-2 < lrs[stop] < 0.3  # after the minimum, not at 1.0
        s = suggest_lr(lrs[: stop + 1], noisy[: stop + 1], 0.98, stopped_early=True)
        # Here minimum/10 is the smaller (the steepest smoothed point lags, see below).
        assert s.rule.startswith(RULE_MIN_OVER_10) and s.suggested_lr == s.min_over_10_lr
        assert steep_region.min() <= s.suggested_lr <= steep_region.max()
        assert 5e-3 < s.min_loss_lr < 3e-2
        # The EMA lags, so the steepest smoothed point sits at or above the true one.
        assert s.steep_lr is not None and 1e-3 < s.steep_lr < 1e-2
        assert s.steep_index is not None and s.steep_index < s.min_index


def test_still_falling_at_the_end_suggests_the_steepest_point():
    lrs = exponential_lrs(1e-5, 1e-1, 40)
    losses = 1 / (1 + np.exp(np.log10(lrs) + 3))  # falls to the end, no minimum inside
    s = suggest_lr(lrs, losses, 0.5, stopped_early=False)
    assert not s.minimum_inside_range and s.min_index == 39
    assert s.rule.startswith("steepest") and s.suggested_lr == s.steep_lr
    assert 1e-4 < s.steep_lr < 1e-2


def test_a_lagging_curve_with_its_minimum_at_the_end_has_no_minimum_inside_the_range():
    lrs = exponential_lrs(1e-5, 1.0, 100)
    # Falls at 1e-3 (row 40), then rises slowly: the true minimum is right after the fall,
    # but the heavily smoothed curve keeps creeping down to the last row.
    losses = np.where(np.log10(lrs) < -3, 0.9, 0.6 + 0.0005 * (np.arange(100) - 40))
    s = suggest_lr(lrs, losses, 0.98, stopped_early=False)
    assert s.min_index == 99 and not s.minimum_inside_range
    assert s.rule.startswith("steepest") and s.suggested_lr == pytest.approx(lrs[40])
    assert suggest_lr(lrs, losses, 0.98, stopped_early=True).minimum_inside_range
    lighter = suggest_lr(lrs, losses, 0.5, stopped_early=False)
    assert lighter.minimum_inside_range and lighter.min_index < 50


def test_ema_lag_in_decades():
    # 0.98 lags 49 steps; 200 steps over 7 decades move 7/199 decade each.
    assert ema_lag_decades(0.98, 1e-7, 1.0, 200) == pytest.approx(49 * 7 / 199)
    assert ema_lag_decades(0.0, 1e-7, 1.0, 200) == 0.0


def test_wide_flat_valley_suggests_the_steepest_point_below_minimum_over_10():
    lrs = exponential_lrs(1e-6, 1.0, 121)  # 20 rows per decade
    x = np.log10(lrs)
    # Falls around 1e-3, a wide valley with its (shallow) minimum at 1e-1, rises after.
    losses = 1 - 0.5 / (1 + np.exp(-(x + 3) / 0.2)) - 0.01 * np.clip(x + 2, 0, 1)
    losses += 0.5 * np.clip(x + 1, 0, None)
    s = suggest_lr(lrs, losses, 0.0, stopped_early=True)
    assert s.min_loss_lr == pytest.approx(0.1) and s.min_over_10_lr == pytest.approx(0.01)
    assert s.steep_lr == pytest.approx(1e-3) and s.suggested_lr == s.steep_lr
    assert s.rule == "steepest (below minimum/10)"


def test_flat_curve_has_no_steep_point_and_falls_back_to_minimum_over_10():
    lrs = exponential_lrs(1e-5, 1e-1, 20)
    losses = np.r_[0.5, np.full(19, 1.0)]  # minimum at the first row
    s = suggest_lr(lrs, losses, 0.0, stopped_early=True)
    assert s.steep_lr is None and s.rule.startswith(RULE_MIN_OVER_10)
    assert s.suggested_lr == pytest.approx(1e-6)


def test_suggestion_ignores_rows_from_the_first_non_finite_loss():
    lrs = exponential_lrs(1e-4, 1.0, 5)
    s = suggest_lr(lrs, [1.0, 0.5, 0.4, math.nan, 0.1], 0.0, stopped_early=True)
    assert s.min_index == 2 and s.min_loss_lr == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="recorded 1 finite loss"):
        suggest_lr(lrs, [1.0, math.nan, 1, 1, 1], 0.0, stopped_early=True)
    with pytest.raises(ValueError, match="1-D of one length"):
        suggest_lr(lrs, [1.0, 2.0], 0.0, stopped_early=True)


def test_range_test_frame_marks_the_smoothed_loss_missing_after_divergence():
    frame = range_test_frame([1e-3, 1e-2, 1e-1], [1.0, 1.0, math.inf], 0.9)
    assert list(frame.columns) == ["lr", "loss", "smoothed"]
    assert frame["smoothed"].tolist()[:2] == [1.0, 1.0] and math.isnan(frame["smoothed"][2])


def test_resolve_lr_reads_the_lr_finder_for_auto(tmp_path):
    fixed = load_config(None, [f"runs_dir={tmp_path}", "train.lr=3e-4"])
    assert resolve_lr(fixed) == pytest.approx(3e-4)
    auto = load_config(None, [f"runs_dir={tmp_path}", "train.lr=auto"])
    with pytest.raises(FileNotFoundError, match=r"run `foldseg lr-find --config"):
        resolve_lr(auto)
    path = lr_find_path(auto)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"suggested_lr": 0.0025}))
    assert resolve_lr(auto) == 0.0025
    path.write_text(json.dumps({"suggested_lr": None}))
    with pytest.raises(ValueError, match="suggested_lr must be a positive number; got None"):
        resolve_lr(auto)


# ---- grid: specs, expansion, names -------------------------------------------------------


def test_grid_spec_values_are_yaml_normalised_by_the_config(base):
    assert parse_grid_spec("train.lr=[1e-3, 3e-4]", base) == ("train.lr", [0.001, 0.0003])
    assert parse_grid_spec("train.batch_size=[8,16]", base) == ("train.batch_size", [8, 16])
    _, sizes = parse_grid_spec("train.crop_size=[[32, 32], [64, 96]]", base)
    assert sizes == [[32, 32], [64, 96]]
    assert parse_grid_spec("model.bn_momentum=[null, 0.9]", base)[1] == [None, 0.9]


def test_grid_spec_errors(base):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'"):
        parse_grid_spec("train.lrr=[1, 2]", base)
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be an integer >= 1; got 'big'"):
        parse_grid_spec("train.batch_size=[8, big]", base)
    with pytest.raises(ValueError, match=r"non-empty YAML list like train.lr=\[a, b\]; got '1e-3'"):
        parse_grid_spec("train.lr=1e-3", base)
    with pytest.raises(ValueError, match=r"must look like key.path=\[v1, v2\]"):
        parse_grid_spec("train.lr", base)
    with pytest.raises(ValueError, match=r"may not vary 'seed'.*--seeds"):
        parse_grid_spec("seed=[1, 2]", base)
    with pytest.raises(ValueError, match=r"values repeat after parsing: \['0.001'\]"):
        parse_grid_spec("train.lr=[1e-3, 0.001]", base)


def test_expansion_is_the_cartesian_product_times_seeds(base):
    grid = [("train.lr", [0.001, 0.0003]), ("train.batch_size", [8, 16])]
    runs = expand_grid("demo", grid, grid_seeds(10, 2))
    assert len(runs) == 8
    assert [(r.settings["train.lr"], r.settings["train.batch_size"], r.seed) for r in runs[:3]] == [
        (0.001, 8, 10),
        (0.001, 8, 11),
        (0.001, 16, 10),
    ]
    assert runs[0].name == "demo__train.lr=0.001__train.batch_size=8__seed=10"
    assert len({r.name for r in runs}) == 8
    config = base.with_overrides(runs[-1].overrides())
    assert (config.train.lr, config.train.batch_size, config.seed) == (0.0003, 16, 11)
    assert config.experiment == runs[-1].name


def test_empty_grid_is_the_base_config_per_seed():
    runs = expand_grid("demo", [], [5, 6, 7])
    assert [r.name for r in runs] == ["demo__seed=5", "demo__seed=6", "demo__seed=7"]
    assert runs[0].label == "(base config)"


def test_expansion_errors():
    with pytest.raises(ValueError, match=r"names a key more than once: \['train.lr'\]"):
        expand_grid("demo", [("train.lr", [1.0]), ("train.lr", [2.0])], [1])
    with pytest.raises(ValueError, match="same experiment name after sanitising"):
        expand_grid("demo", [("data.classes", [["a b"], ["a/b"]])], [1])
    with pytest.raises(ValueError, match="--seeds must be an integer >= 1; got 0"):
        grid_seeds(1, 0)


def test_names_are_exact_and_safe():
    assert format_value([32, 64]) == "32x64" and format_value(None) == "null"
    assert format_value(1e-05) == "1e-05" and format_value(True) == "true"
    assert sanitise_name("a b/c:d") == "a-b-c-d"
    name = experiment_name("my exp", {"augment": [{"name": "HorizontalFlip"}]}, 3)
    assert "/" not in name and " " not in name and name.endswith("__seed=3")


def test_parse_folds():
    assert parse_folds(None, 3) == [0, 1, 2]
    assert parse_folds("0,2", 3) == [0, 2]
    with pytest.raises(ValueError, match=r"folds in \[0, 2\]; got '0,3'"):
        parse_folds("0,3", 3)
    with pytest.raises(ValueError, match="a fold twice"):
        parse_folds("1,1", 3)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_folds("one", 3)


# ---- grid: result tables -------------------------------------------------------------


def hand_made_grid(b_seed3: tuple[float, float]):
    """Settings A and B, seeds 1..3, folds 0 and 1; C with a failed fold."""
    grid = [("train.lr", [0.001, 0.003, 0.01])]
    runs = expand_grid("demo", grid, [1, 2, 3])
    a, b, c = [r.name for r in runs[:3]], [r.name for r in runs[3:6]], runs[6:]
    scores = dict(
        zip(a, [{0: 0.6, 1: 0.8}, {0: 0.5, 1: 0.7}, {0: 0.7, 1: 0.9}], strict=True)
    )  # CV 0.7, 0.6, 0.8
    scores.update(
        zip(b, [{0: 0.5, 1: 0.7}, {0: 0.45, 1: 0.55}, dict(enumerate(b_seed3))], strict=True)
    )
    scores.update({c[0].name: {0: 0.2}, c[1].name: {0: 0.3, 1: 0.1}, c[2].name: {0: 0.4, 1: 0.2}})
    status = {r.name: "done" for r in runs}
    results = make_results_table(runs, scores, [0, 1], status)
    return results, summarise_grid(results, ["train.lr"])


def test_results_table_has_one_row_per_run_with_fold_scores_and_cv_mean():
    results, _ = hand_made_grid((0.65, 0.85))
    assert list(results.columns) == [
        "experiment", "setting", "train.lr", "seed", "status", "fold_0", "fold_1", "cv_mean"
    ]  # fmt: skip
    first = results.iloc[0]
    assert (first["setting"], first["seed"], first["cv_mean"]) == ("train.lr=0.001", 1, 0.7)
    failed = results[results["experiment"] == "demo__train.lr=0.01__seed=1"].iloc[0]
    assert math.isnan(failed["fold_1"]) and math.isnan(failed["cv_mean"])


def test_summary_means_stds_and_order():
    _, summary = hand_made_grid((0.65, 0.85))
    assert summary["setting"].tolist() == ["train.lr=0.001", "train.lr=0.003", "train.lr=0.01"]
    a, b, c = (summary.iloc[i] for i in range(3))
    assert a["mean_cv"] == pytest.approx(0.7) and a["mean_all"] == pytest.approx(0.7)
    assert a["std_seeds"] == pytest.approx(0.1)  # std of 0.7, 0.6, 0.8
    assert a["std_folds"] == pytest.approx(math.sqrt(0.02))  # each run: var 0.02
    assert b["mean_cv"] == pytest.approx((0.6 + 0.5 + 0.75) / 3)
    assert b["std_folds"] == pytest.approx(math.sqrt((0.02 + 0.005 + 0.02) / 3))
    assert (a["n_runs"], a["n_folds"]) == (3, 6)
    # C: the failed run counts in mean_all and n_folds, not in mean_cv or n_runs.
    assert c["mean_cv"] == pytest.approx(0.25) and c["mean_all"] == pytest.approx(0.24)
    assert (c["n_runs"], c["n_folds"]) == (2, 5)
    assert c["std_folds"] == pytest.approx(math.sqrt(0.02))


def test_paired_verdict_likely_real():
    results, summary = hand_made_grid((0.65, 0.85))  # differences by seed: .1, .1, .05
    verdict = compare_top_two(results, summary)
    assert verdict.n_pairs == 3
    assert verdict.difference == pytest.approx(0.25 / 3)
    assert verdict.standard_error == pytest.approx(np.std([0.1, 0.1, 0.05], ddof=1) / math.sqrt(3))
    assert verdict.verdict.startswith("likely real")
    assert "+0.0833 +/- 0.0167" in verdict.describe()


def test_paired_verdict_within_noise():
    results, summary = hand_made_grid((0.9, 1.0))  # B: .6, .5, .95; differences .1, .1, -.15
    assert summary["setting"].iloc[0] == "train.lr=0.001"  # 0.7 vs 0.6833
    verdict = compare_top_two(results, summary)
    assert verdict.verdict.startswith("within noise")


def test_paired_verdict_needs_two_seeds():
    runs = expand_grid("demo", [("train.lr", [0.1, 0.2])], [1])
    scores = {runs[0].name: {0: 0.5}, runs[1].name: {0: 0.4}}
    results = make_results_table(runs, scores, [0], {})
    summary = summarise_grid(results, ["train.lr"])
    verdict = compare_top_two(results, summary)
    assert verdict.n_pairs == 1 and verdict.verdict.startswith("cannot judge")
    assert "difference +0.1000 on one seed" in verdict.describe()
    assert compare_top_two(results, summary.iloc[:1]) is None
    assert isinstance(results, pd.DataFrame) and isinstance(runs[0], GridRun)


def test_tuned_runs_are_ranked_and_paired_by_the_nested_figure():
    """With --tune the nested tuned CV decides: here A has the better OOF at 0.5 on every
    seed but B the better nested figure, on every seed."""
    runs = expand_grid("demo", [("postprocess.min_components", [0, 100])], [1, 2, 3])
    a, b = runs[:3], runs[3:]
    scores = {r.name: {0: 0.6, 1: 0.6} for r in a} | {r.name: {0: 0.5, 1: 0.5} for r in b}
    nested = dict(zip([r.name for r in runs], [0.70, 0.71, 0.69, 0.75, 0.78, 0.72], strict=True))
    tuned = {name: {"tuned_nested": value, "tuned": value + 0.05} for name, value in nested.items()}
    del tuned[b[2].name]  # one run not tuned: NaN, left out of the means and the pairs
    results = make_results_table(runs, scores, [0, 1], {}, tuned)
    assert list(results.columns[-3:]) == ["cv_mean", "nested_cv", "tuned_cv_in_sample"]
    assert math.isnan(results.iloc[5]["nested_cv"])
    summary = summarise_grid(results, ["postprocess.min_components"])
    assert summary["setting"].tolist() == [
        "postprocess.min_components=100",
        "postprocess.min_components=0",
    ]  # by mean_nested, although mean_cv says the opposite
    best = summary.iloc[0]
    assert best["mean_nested"] == pytest.approx(0.765)
    assert best["mean_tuned_in_sample"] == pytest.approx(0.815)
    assert best["std_seeds_nested"] == pytest.approx(np.std([0.75, 0.78], ddof=1))
    verdict = compare_top_two(results, summary)
    assert verdict.n_pairs == 2 and verdict.measure == "nested tuned CV"
    assert verdict.difference == pytest.approx((0.05 + 0.07) / 2)
    assert "compared on: nested tuned CV" in verdict.describe()
    untuned = make_results_table(runs, scores, [0, 1], {})
    assert "nested_cv" not in untuned.columns
    assert compare_top_two(untuned, summarise_grid(untuned, [])).measure.startswith("OOF")

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.postprocess import (
    AT_LEAST_ONE_TOPK,
    PostprocessParams,
    apply_gate,
    at_least_one_applied,
    binarize,
    load_postprocess,
    postprocess_image,
    postprocess_mask,
    quantise_threshold,
    remove_small_components,
    remove_small_mask,
    resolve_at_least_one,
    save_postprocess,
    segmentation_score,
    topk_count,
)


def test_binarize_float_is_at_or_above() -> None:
    prob = np.array([[0.1, 0.5], [0.49, 0.9]], dtype=np.float32)
    mask = binarize(prob, 0.5)
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 1], [0, 1]]
    assert binarize(prob, 0.0).sum() == 4 and binarize(prob, 1.0).sum() == 0


def test_quantise_threshold_hand_checked() -> None:
    assert quantise_threshold(0.5) == 128  # 127.5 -> on from level 128
    assert quantise_threshold(0.4) == 102  # 0.4 * 255 = 102 exactly (float says 102.00000000000001)
    assert quantise_threshold(0.0) == 0
    assert quantise_threshold(1.0) == 255
    assert quantise_threshold(0.975) == 249
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]; got 1.5"):
        quantise_threshold(1.5)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]; got -0.1"):
        binarize(np.zeros((2, 2), dtype=np.float32), -0.1)


def test_binarize_uint8_uses_levels() -> None:
    q = np.array([[101, 102], [127, 128]], dtype=np.uint8)
    assert binarize(q, 0.4).tolist() == [[0, 1], [1, 1]]
    assert binarize(q, 0.5).tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize("threshold", [round(t, 4) for t in np.linspace(0, 1, 41)] + [0.975])
def test_uint8_rule_matches_float_rule_on_dequantised(threshold: float) -> None:
    q = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(binarize(q, threshold), binarize(q / 255.0, threshold))


def test_remove_small_mask() -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, :3] = 1
    assert remove_small_mask(mask, 4).sum() == 0
    np.testing.assert_array_equal(remove_small_mask(mask, 3), mask)
    np.testing.assert_array_equal(remove_small_mask(mask, 0), mask)


def test_remove_small_components_8_connected() -> None:
    mask = np.array(
        [
            [1, 0, 0, 0, 1],
            [0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0],
        ],
        dtype=np.uint8,
    )
    # The diagonal pair is one component of 2 (8-connectivity); the lone pixel is 1.
    out = remove_small_components(mask, 2)
    expected = mask.copy()
    expected[0, 4] = 0
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert remove_small_components(mask, 3).tolist() == [[0] * 5] * 3 + [[1, 1, 1, 0, 0]]
    assert remove_small_components(mask, 4).sum() == 0
    np.testing.assert_array_equal(remove_small_components(mask, 1), mask)
    assert remove_small_components(np.zeros((3, 3), np.uint8), 5).sum() == 0


def test_apply_gate() -> None:
    mask = np.ones((2, 2), dtype=np.uint8)
    assert apply_gate(mask, 0.3, 0.5).sum() == 0
    assert apply_gate(mask, 0.5, 0.5).sum() == 4
    assert apply_gate(mask, 0.0, None).sum() == 4


def test_segmentation_score_hand_checked() -> None:
    q = np.array([[0, 255, 51], [102, 0, 0]], dtype=np.uint8)
    assert topk_count(6, 0.5) == 3
    assert segmentation_score(q, 0.5) == pytest.approx((255 + 102 + 51) / (3 * 255))
    assert segmentation_score(q, 0.01) == 1.0  # k floors at 1
    assert segmentation_score(q / 255.0, 0.5) == segmentation_score(q, 0.5)
    with pytest.raises(ValueError, match=r"topk_fraction must be in \(0, 1\]; got 0"):
        topk_count(6, 0)


def test_postprocess_mask_order() -> None:
    prob = np.zeros((5, 5), dtype=np.float32)
    prob[0, 0] = 0.9  # a lone pixel: removed by components
    prob[2:5, 2:5] = 0.6  # a 3x3 blob: 9 pixels
    assert postprocess_mask(prob, 0.5, 0).sum() == 10
    assert postprocess_mask(prob, 0.5, 0, min_component=2).sum() == 9
    # Components are removed before the area check: 9 < 10 blanks the mask.
    assert postprocess_mask(prob, 0.5, 10, min_component=2).sum() == 0
    assert postprocess_mask(prob, 0.5, 10).sum() == 10
    assert postprocess_mask(prob, 0.5, 0, gate_score=0.2, gate_threshold=0.3).sum() == 0
    assert postprocess_mask(prob, 0.5, 0, gate_score=0.3, gate_threshold=0.3).sum() == 10
    assert postprocess_mask(prob, 0.7, 0).sum() == 1
    with pytest.raises(ValueError, match=r"gate_score is needed with gate_threshold 0\.3"):
        postprocess_mask(prob, 0.5, 0, gate_threshold=0.3)


def test_params_apply_each_gate() -> None:
    prob = np.zeros((4, 4), dtype=np.float32)
    prob[:2, :2] = 0.8
    plain = PostprocessParams(0.5, 0)
    assert plain.apply(prob).sum() == 4
    clf = PostprocessParams(0.5, 0, gate="classifier", gate_threshold=0.5)
    assert clf.apply(prob, classifier_prob=0.4).sum() == 0
    assert clf.apply(prob, classifier_prob=0.6).sum() == 4
    with pytest.raises(ValueError, match="classifier_prob is needed"):
        clf.apply(prob)
    # Top 25% = the 4 pixels at 0.8 -> score 204/255 = 0.8.
    seg = PostprocessParams(0.5, 0, gate="segmentation", gate_threshold=0.8, topk_fraction=0.25)
    assert seg.apply(prob).sum() == 4
    seg = PostprocessParams(0.5, 0, gate="segmentation", gate_threshold=0.81, topk_fraction=0.25)
    assert seg.apply(prob).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 2.0, "min_area": 0}, r"threshold must be in \[0, 1\]"),
        ({"threshold": 0.5, "min_area": -1}, "min_area must be an integer >= 0; got -1"),
        ({"threshold": 0.5, "min_area": 1.5}, "min_area must be an integer >= 0; got 1.5"),
        ({"threshold": 0.5, "min_area": 0, "gate": "cls"}, "gate must be one of none, classifier"),
        (
            {"threshold": 0.5, "min_area": 0, "gate": "classifier"},
            "gate_threshold must be set iff gate is not 'none'",
        ),
        (
            {"threshold": 0.5, "min_area": 0, "gate_threshold": 0.5},
            "gate_threshold must be set iff gate is not 'none'",
        ),
        (
            {"threshold": 0.5, "min_area": 0, "gate": "segmentation", "gate_threshold": 0.5},
            "topk_fraction must be set iff gate is one of",
        ),
        (
            {"threshold": 0.5, "min_area": 0, "gate": "classifier", "gate_threshold": 3.0},
            r"gate_threshold must be in \[0, 1\]; got 3.0",
        ),
    ],
)
def test_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostprocessParams(**kwargs)


def test_postprocess_json_round_trip(tmp_path: Path) -> None:
    params = {
        "Fish": PostprocessParams(0.45, 10000),
        "Sugar": PostprocessParams(0.6, 0, 50, "classifier", 0.3),
        "Gravel": PostprocessParams(0.5, 5000, 0, "segmentation", 0.7, 0.01),
    }
    path = tmp_path / "run" / "postprocess.json"
    save_postprocess(path, params, {"cv": 0.66})
    loaded, extra = load_postprocess(path, ["Fish", "Sugar", "Gravel"])
    assert loaded == params and extra == {"cv": 0.66}
    assert list(loaded) == ["Fish", "Sugar", "Gravel"]
    assert list(load_postprocess(path, ["Gravel", "Sugar", "Fish"])[0]) == [
        "Gravel",
        "Sugar",
        "Fish",
    ]
    assert [p.name for p in path.parent.iterdir()] == ["postprocess.json"]


def test_load_postprocess_errors(tmp_path: Path) -> None:
    path = tmp_path / "postprocess.json"
    with pytest.raises(FileNotFoundError, match=r"postprocess\.json does not exist"):
        load_postprocess(path)
    save_postprocess(path, {"Fish": PostprocessParams(0.5, 0), "Sugar": PostprocessParams(0.5, 0)})
    with pytest.raises(ValueError, match="missing class 'Gravel'"):
        load_postprocess(path, ["Fish", "Sugar", "Gravel"])
    with pytest.raises(ValueError, match="unknown class 'Sugar'"):
        load_postprocess(path, ["Fish"])

    def write(payload: object) -> None:
        path.write_text(json.dumps(payload))

    write({"classes": {"Fish": {"threshold": 0.5, "min_area": 0, "min_size": 3}}, "extra": {}})
    with pytest.raises(ValueError, match=r"postprocess\.json class 'Fish': unknown key 'min_size'"):
        load_postprocess(path)
    write({"classes": {"Fish": {"threshold": 0.5}}, "extra": {}})
    with pytest.raises(ValueError, match="class 'Fish': missing key 'min_area'"):
        load_postprocess(path)
    write({"classes": {"Fish": {"threshold": 7, "min_area": 0}}, "extra": {}})
    with pytest.raises(ValueError, match=r"class 'Fish': threshold must be in \[0, 1\]; got 7"):
        load_postprocess(path)
    write({"classes": {"Fish": 0.5}, "extra": {}})
    with pytest.raises(ValueError, match="class 'Fish': must be a mapping"):
        load_postprocess(path)
    write({"classes": {}, "extras": {}})
    with pytest.raises(
        ValueError, match=r"must have keys \['classes', 'extra'\]; got \['classes', 'extras'\]"
    ):
        load_postprocess(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_postprocess(path)


def test_fused_gate_averages_the_classifier_and_the_top_k_mean() -> None:
    prob = np.zeros((4, 4), dtype=np.uint8)
    prob[:2, :2] = 255  # top-k mean over 4 pixels (k = 0.25 * 16) is 1.0
    params = PostprocessParams(0.5, 0, 0, "fused", 0.6, 0.25)
    assert params.uses_classifier
    assert params.apply(prob, classifier_prob=0.4).sum() == 4  # (0.4 + 1.0) / 2 = 0.7
    assert params.apply(prob, classifier_prob=0.1).sum() == 0  # (0.1 + 1.0) / 2 = 0.55
    with pytest.raises(ValueError, match="classifier_prob is needed for gate 'fused'"):
        params.apply(prob)
    with pytest.raises(ValueError, match="topk_fraction must be set iff gate is one of"):
        PostprocessParams(0.5, 0, 0, "fused", 0.6)
    assert not PostprocessParams(0.5, 0, 0, "segmentation", 0.6, 0.25).uses_classifier


def _three_classes() -> tuple[np.ndarray, list[PostprocessParams]]:
    """(3, 10, 10) uint8 probs: class 1 has the highest top-k mean, all below their area."""
    q = np.zeros((3, 10, 10), np.uint8)
    q[0, :2, :2] = 200  # 4 px at 200
    q[1, 5:8, 5:8] = 250  # 9 px at 250: the highest top-1% mean
    q[1, 0, 9] = 140  # a single pixel the component rule removes
    q[2, 3:5, 3:5] = 120  # under its threshold
    params = [
        PostprocessParams(threshold=0.5, min_area=20),
        PostprocessParams(threshold=0.5, min_area=20, min_component=2),
        PostprocessParams(
            threshold=0.6, min_area=0, gate="segmentation", gate_threshold=0.9, topk_fraction=0.5
        ),
    ]
    return q, params


def test_postprocess_image_is_each_class_apply_without_the_rule() -> None:
    q, params = _three_classes()
    q[0, :5, :5] = 220  # now class 0 passes its area
    masks = postprocess_image(q, params)
    expected = np.stack([p.apply(q[c]) for c, p in enumerate(params)])
    np.testing.assert_array_equal(masks, expected)
    # An image with a mask is left alone by the rule.
    np.testing.assert_array_equal(postprocess_image(q, params, at_least_one=True), expected)


def test_at_least_one_keeps_the_class_with_the_highest_topk_mean_without_area_or_gate() -> None:
    q, params = _three_classes()
    assert not postprocess_image(q, params).any()
    scores = [segmentation_score(q[c], AT_LEAST_ONE_TOPK) for c in range(3)]
    assert int(np.argmax(scores)) == 1
    masks = postprocess_image(q, params, at_least_one=True)
    expected = np.zeros_like(q)
    expected[1, 5:8, 5:8] = 1  # threshold and components applied, the area waived
    np.testing.assert_array_equal(masks, expected)
    # Float probs give the same masks as their uint8 levels.
    floats = q.astype(np.float64) / 255
    np.testing.assert_array_equal(postprocess_image(floats, params, at_least_one=True), expected)


def test_at_least_one_leaves_empty_what_has_nothing_above_its_threshold() -> None:
    q = np.full((2, 4, 4), 10, np.uint8)
    params = [PostprocessParams(threshold=0.5, min_area=0)] * 2
    assert not postprocess_image(q, params, at_least_one=True).any()


def test_at_least_one_choices_and_the_stored_flag() -> None:
    assert resolve_at_least_one("always", False) is True
    assert resolve_at_least_one("never", True) is False
    assert resolve_at_least_one("auto", True) is True
    assert resolve_at_least_one("auto", False) is False
    assert resolve_at_least_one("search", True) is False  # tune decides
    with pytest.raises(
        ValueError, match=r"at_least_one must be one of \['never', 'always', 'auto', 'search'\]"
    ):
        resolve_at_least_one("yes", True)
    assert at_least_one_applied({}) is False  # a file from before the rule
    assert at_least_one_applied({"at_least_one": {"applied": True}}) is True
    assert at_least_one_applied({"at_least_one": {"applied": "true"}}) is False


def test_postprocess_image_needs_one_setting_per_class() -> None:
    with pytest.raises(ValueError, match="probs must hold 1 class maps; got 2"):
        postprocess_image(np.zeros((2, 3, 3), np.uint8), [PostprocessParams(0.5, 0)])

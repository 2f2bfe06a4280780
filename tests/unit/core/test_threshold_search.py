import itertools

import numpy as np
import pytest

from pipeline.core.level_counts import dice_from_counts
from pipeline.core.postprocess import PostprocessParams, postprocess_mask, segmentation_score
from pipeline.core.threshold_search import GridAccumulator

CLASSES = ["a", "b", "c"]
THRESHOLDS = [0.1, 0.3, 0.4, 0.5, 0.6, 0.85]
MIN_AREAS = [0, 5, 20, 60]
GATE_THRESHOLDS = [0.2, 0.5, 0.8]
TOPK = 0.05
N_FOLDS = 3


def _oof(seed: int = 0, n: int = 18) -> list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Small random OOF set: blobby probs, truths with empty ones, empty predictions."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = (12, 15) if i % 3 else (9, 9)
        base = rng.random((len(CLASSES), h, w))
        truth = (base + 0.4 * rng.random(base.shape) > 0.9).astype(np.uint8)
        # Scaled per class so the top-k gate score varies; 0 and 0.05 give empty predictions.
        scale = rng.choice([0.0, 0.05, 0.5, 0.75, 1.0], size=(len(CLASSES), 1, 1))
        prob = np.clip(0.7 * base + 0.3 * rng.random(base.shape), 0, 1) * scale
        truth[i % len(CLASSES)] = 0  # every class has images with empty truth
        q = np.rint(prob * 255).astype(np.uint8)
        classifier = rng.random(len(CLASSES))
        if i % 5 == 0:
            # Gate scores exactly on a gate threshold: the top-k mean is 204 / 255 = 0.8.
            c = (i + 2) % len(CLASSES)
            q[c] = np.minimum(q[c], 204)
            q[c, :2] = 204
            classifier[c] = 0.5
        items.append((f"img{i}", i % N_FOLDS, q, truth, classifier))
    return items


def _kaggle_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(pred, truth).sum() / total


def _brute_force(items: list) -> dict:
    """Dice sums per (class, fold, gate kind, t, a, g) by applying postprocess_mask."""
    gates = [("none", None)] + [
        (kind, g) for kind in ("classifier", "segmentation", "fused") for g in GATE_THRESHOLDS
    ]
    sums: dict = {}
    for _, fold, q, truth, classifier in items:
        prob = q / 255.0
        for c in range(len(CLASSES)):
            seg = segmentation_score(q[c], TOPK)
            for (kind, g), t, a in itertools.product(gates, THRESHOLDS, MIN_AREAS):
                score = {
                    "none": None,
                    "classifier": classifier[c],
                    "segmentation": seg,
                    "fused": (classifier[c] + seg) / 2,
                }[kind]
                mask = postprocess_mask(prob[c], t, a, 0, score, g)
                key = (c, fold, kind, t, a, g)
                sums[key] = sums.get(key, 0.0) + _kaggle_dice(mask, truth[c])
    return sums


def _accumulate(items: list, **kwargs: object) -> GridAccumulator:
    acc = GridAccumulator(CLASSES, THRESHOLDS, MIN_AREAS, GATE_THRESHOLDS, N_FOLDS, TOPK, **kwargs)
    for image_id, fold, q, truth, classifier in items:
        gates = kwargs.get("gates", ("none", "classifier", "segmentation"))
        acc.add(image_id, fold, q, truth, classifier if "classifier" in gates else None)
    return acc


def test_dice_from_counts_hand_checked() -> None:
    assert dice_from_counts(np.array(0), np.array(0), np.array(0)) == 1.0
    assert dice_from_counts(np.array(4), np.array(2), np.array(4)) == 0.5
    assert dice_from_counts(np.array(0), np.array(0), np.array(3)) == 0.0


def test_streaming_equals_brute_force_at_every_grid_point() -> None:
    items = _oof()
    result = _accumulate(items).result()
    brute = _brute_force(items)
    counts = np.bincount([fold for _, fold, *_ in items], minlength=N_FOLDS)
    assert result.fold_counts == tuple(counts)
    n = len(items)
    for c, (ti, t), (ai, a) in itertools.product(
        range(len(CLASSES)), enumerate(THRESHOLDS), enumerate(MIN_AREAS)
    ):
        total = sum(brute[(c, f, "none", t, a, None)] for f in range(N_FOLDS))
        assert result.no_gate_table[c, ti, ai] == pytest.approx(total / n, abs=1e-12)
        for kind, (gi, g) in itertools.product(result.gate_tables, enumerate(GATE_THRESHOLDS)):
            total = sum(brute[(c, f, kind, t, a, g)] for f in range(N_FOLDS))
            assert result.gate_tables[kind][c, ti, ai, 1 + gi] == pytest.approx(
                total / n, abs=1e-12
            )
            assert result.gate_tables[kind][c, ti, ai, 0] == result.no_gate_table[c, ti, ai]

    # The choice is the brute-force argmax, the scores and fold spread follow from it.
    for c, name in enumerate(CLASSES):
        totals = {}
        for key, value in brute.items():
            if key[0] == c:
                totals[key[2:]] = totals.get(key[2:], 0.0) + value / n
        best = max(totals.values())
        chosen = result.per_class[name]
        p = chosen.params
        key = (p.gate, p.threshold, p.min_area, p.gate_threshold)
        assert totals[key] == pytest.approx(best, abs=1e-12)
        assert chosen.score == pytest.approx(best, abs=1e-12)
        folds = [brute[(c, f, *key)] / counts[f] for f in range(N_FOLDS)]
        np.testing.assert_allclose(chosen.fold_scores, folds, atol=1e-12)
        no_gate_best = max(v for k, v in totals.items() if k[0] == "none")
        assert chosen.no_gate_score == pytest.approx(no_gate_best, abs=1e-12)
        assert chosen.no_gate_params.gate == "none"
        assert chosen.plain_score == pytest.approx(totals[("none", 0.5, 0, None)], abs=1e-12)
        assert chosen.score >= chosen.no_gate_score >= chosen.plain_score - 1e-12

    overall_folds = np.mean([result.per_class[c].fold_scores for c in CLASSES], axis=0)
    np.testing.assert_allclose(result.fold_scores, overall_folds)
    assert result.fold_mean == pytest.approx(overall_folds.mean())
    assert result.fold_std == pytest.approx(overall_folds.std())
    assert result.score == pytest.approx(np.mean([result.per_class[c].score for c in CLASSES]))


def test_chosen_params_reproduce_the_score_on_uint8_probs() -> None:
    items = _oof(seed=1)
    result = _accumulate(items).result()
    for c, name in enumerate(CLASSES):
        params = result.per_class[name].params
        dice = [
            _kaggle_dice(params.apply(q[c], classifier_prob=clf[c]), truth[c])
            for _, _, q, truth, clf in items
        ]
        assert np.mean(dice) == pytest.approx(result.per_class[name].score, abs=1e-12)


def test_ties_go_to_the_simplest_setting() -> None:
    # Truth empty and probs all zero: every setting scores 1.
    q = np.zeros((3, 6, 6), dtype=np.uint8)
    acc = GridAccumulator(CLASSES, [0.9, 0.45, 0.55, 0.3], [10, 0], [0.5], 1, TOPK)
    acc.add("x", 0, q, q.copy(), np.full(3, 0.9))
    result = acc.result()
    assert result.per_class["a"].params == PostprocessParams(0.45, 0)
    assert result.score == 1.0 == result.plain_score
    # Without "none": the first gate kind in GATE_KINDS order, then the lowest threshold.
    acc = GridAccumulator(
        ["a"], [0.9, 0.55], [10, 0], [0.8, 0.2], 1, TOPK, gates=("segmentation", "classifier")
    )
    acc.add("x", 0, q[:1], q[:1].copy(), np.array([0.9]))
    params = acc.result().per_class["a"].params
    assert params == PostprocessParams(0.55, 0, 0, "classifier", 0.2)
    assert acc.result().per_class["a"].no_gate_params == PostprocessParams(0.55, 0)


def test_gate_wins_when_it_removes_false_positives() -> None:
    acc = GridAccumulator(["a"], [0.5], [0], [0.5], 2, TOPK)
    fp = np.full((1, 4, 4), 200, dtype=np.uint8)
    acc.add("fp", 0, fp, np.zeros((1, 4, 4), np.uint8), np.array([0.1]))
    acc.add("tp", 1, fp, np.ones((1, 4, 4), np.uint8), np.array([0.9]))
    result = acc.result()
    assert result.per_class["a"].params == PostprocessParams(0.5, 0, 0, "classifier", 0.5)
    assert result.score == 1.0 and result.no_gate_score == 0.5 and result.plain_score == 0.5
    assert result.per_class["a"].fold_scores == (1.0, 1.0)
    summary = result.summary()
    assert list(summary["class"]) == ["a", "overall"]
    assert summary.loc[0, "gate"] == "classifier"
    frame = result.table_frame()
    assert len(frame) == 1 + 3
    assert set(frame["gate"]) == {"none", "classifier", "segmentation", "fused"}
    assert result.to_dict()["scores"]["tuned"] == 1.0


def test_gates_restrict_the_candidates() -> None:
    items = _oof()
    result = _accumulate(items, gates=("none",)).result()
    assert result.gate_tables == {}
    assert all(r.params.gate == "none" for r in result.per_class.values())
    result = _accumulate(items, gates=("segmentation",)).result()
    assert list(result.gate_tables) == ["segmentation"]
    assert all(r.params.gate == "segmentation" for r in result.per_class.values())
    assert all(r.params.topk_fraction == TOPK for r in result.per_class.values())


def test_empty_fold_gives_nan_fold_score() -> None:
    acc = GridAccumulator(["a"], [0.5], [0], [0.5], 3, TOPK, gates=("none",))
    q = np.full((1, 2, 2), 200, np.uint8)
    acc.add("x", 0, q, np.ones((1, 2, 2), np.uint8))
    acc.add("y", 2, q, np.zeros((1, 2, 2), np.uint8))
    result = acc.result()
    assert np.isnan(result.fold_scores[1])
    assert result.fold_scores[0] == 1.0 and result.fold_scores[2] == 0.0
    assert result.fold_mean == 0.5 and result.fold_std == 0.5


def test_errors() -> None:
    with pytest.raises(ValueError, match="thresholds must not repeat"):
        GridAccumulator(["a"], [0.5, 0.5], [0], [0.5], 1, TOPK)
    with pytest.raises(ValueError, match=r"thresholds must lie in \[0, 1\]"):
        GridAccumulator(["a"], [1.5], [0], [0.5], 1, TOPK)
    with pytest.raises(ValueError, match="min_areas must be integers >= 0"):
        GridAccumulator(["a"], [0.5], [-1], [0.5], 1, TOPK)
    with pytest.raises(ValueError, match="min_areas must be integers >= 0"):
        GridAccumulator(["a"], [0.5], [2.5], [0.5], 1, TOPK)
    with pytest.raises(ValueError, match="gates must be distinct values from"):
        GridAccumulator(["a"], [0.5], [0], [0.5], 1, TOPK, gates=("area",))
    with pytest.raises(ValueError, match="gate_thresholds must hold a value"):
        GridAccumulator(["a"], [0.5], [0], [], 1, TOPK)
    with pytest.raises(ValueError, match="n_folds must be >= 1; got 0"):
        GridAccumulator(["a"], [0.5], [0], [0.5], 0, TOPK)
    with pytest.raises(ValueError, match=r"topk_fraction must be in \(0, 1\]"):
        GridAccumulator(["a"], [0.5], [0], [0.5], 1, 0.0)

    acc = GridAccumulator(["a", "b"], [0.5], [0], [0.5], 2, TOPK)
    q = np.zeros((2, 3, 3), np.uint8)
    clf = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match="no image was added"):
        acc.result()
    with pytest.raises(ValueError, match=r"fold of 'x' must be in \[0, 1\]; got 2"):
        acc.add("x", 2, q, q, clf)
    with pytest.raises(ValueError, match=r"q of 'x' must be uint8 \(2, H, W\)"):
        acc.add("x", 0, q.astype(np.float32), q, clf)
    with pytest.raises(ValueError, match=r"truth of 'x' must have shape \(2, 3, 3\)"):
        acc.add("x", 0, q, q[:, :2], clf)
    with pytest.raises(ValueError, match="truth of 'x' must be uint8 in"):
        acc.add("x", 0, q, q + 2, clf)
    with pytest.raises(ValueError, match="classifier_prob of 'x' must be given iff"):
        acc.add("x", 0, q, q)
    with pytest.raises(ValueError, match=r"classifier_prob of 'x' must be \(2,\) in \[0, 1\]"):
        acc.add("x", 0, q, q, np.array([0.5, 1.5]))
    acc.add("x", 0, q, q.astype(bool), clf)
    with pytest.raises(ValueError, match="image_id 'x' was already added"):
        acc.add("x", 1, q, q, clf)
    assert acc.result().fold_counts == (1, 0)


def test_batched_histograms_equal_image_by_image() -> None:
    from pipeline.core.level_counts import class_histograms

    items = _oof(seed=4, n=17)  # two image sizes, every fold, within each batch
    one_by_one = _accumulate(items).result()
    batched = GridAccumulator(CLASSES, THRESHOLDS, MIN_AREAS, GATE_THRESHOLDS, N_FOLDS, TOPK)
    for start in range(0, len(items), 7):
        batch = items[start : start + 7]
        batched.add_histograms(
            [image_id for image_id, *_ in batch],
            [fold for _, fold, *_ in batch],
            np.stack([class_histograms(q, truth) for _, _, q, truth, _ in batch]),
            [q.shape[1] * q.shape[2] for _, _, q, _, _ in batch],
            np.stack([clf for *_, clf in batch]),
        )
    result = batched.result()
    assert result.fold_counts == one_by_one.fold_counts
    np.testing.assert_allclose(result.no_gate_table, one_by_one.no_gate_table, atol=1e-12)
    for kind, table in one_by_one.gate_tables.items():
        np.testing.assert_allclose(result.gate_tables[kind], table, atol=1e-12)
    assert result.params_by_class() == one_by_one.params_by_class()

    q = items[0][2]
    hist = class_histograms(q, items[0][3])[None]
    with pytest.raises(ValueError, match="already added"):
        batched.add_histograms([items[0][0]], [0], hist, q[0].size, items[0][4][None])
    with pytest.raises(ValueError, match=r"hists must be \(2, 3, 2, 256\)"):
        batched.add_histograms(["n1", "n2"], [0, 1], hist, q[0].size, items[0][4][None])
    with pytest.raises(ValueError, match="fold of 'n1' must be in"):
        batched.add_histograms(["n1"], [3], hist, q[0].size, items[0][4][None])
    with pytest.raises(ValueError, match="'n1' was already added"):
        batched.add_histograms(["n1", "n1"], [0, 0], np.repeat(hist, 2, 0), q[0].size)


def test_nested_scores_each_fold_with_the_setting_chosen_on_the_others() -> None:
    items = _oof(seed=2, n=24)
    result = _accumulate(items).result()
    counts = np.bincount([fold for _, fold, *_ in items], minlength=N_FOLDS)
    for c, name in enumerate(CLASSES):
        chosen = result.per_class[name]
        sums = []
        for fold in range(N_FOLDS):
            others = _accumulate([item for item in items if item[1] != fold]).result()
            params = others.per_class[name].params
            assert chosen.nested_params[fold] == params
            dice = [
                _kaggle_dice(params.apply(q[c], classifier_prob=clf[c]), truth[c])
                for _, f, q, truth, clf in items
                if f == fold
            ]
            assert chosen.nested_fold_scores[fold] == pytest.approx(np.mean(dice), abs=1e-12)
            sums.append(np.sum(dice))
        assert chosen.nested_score == pytest.approx(sum(sums) / counts.sum(), abs=1e-12)
        agreeing = sum(p == chosen.params for p in chosen.nested_params)
        assert result.stability()[name]["folds_agreeing"] == agreeing
        assert chosen.stable == (agreeing == N_FOLDS)
    assert result.nested_score == pytest.approx(
        np.mean([result.per_class[c].nested_score for c in CLASSES])
    )
    saved = result.to_dict()
    assert saved["scores"]["tuned_nested"] == result.nested_score
    assert saved["scores"]["tuned"] == result.score


def test_nested_tuning_exposes_a_setting_that_only_fits_in_sample() -> None:
    """Fold 0 needs threshold 0.3 (a faint true pixel), fold 1 needs 0.6 (a false pixel
    at 0.47): in-sample scores the best single setting on both; nested scores each fold
    with the other's choice, which fails it."""
    acc = GridAccumulator(["a"], [0.3, 0.6], [0], [0.5], 2, TOPK, gates=("none",))
    truth = np.zeros((1, 2, 2), dtype=np.uint8)
    truth[0, 0, 0] = 1
    faint = np.zeros((1, 2, 2), dtype=np.uint8)
    faint[0, 0, 0] = 102  # 0.4: kept by 0.3 only
    noisy = np.zeros((1, 2, 2), dtype=np.uint8)
    noisy[0, 0, 0], noisy[0, 1, 1] = 200, 120  # a false pixel at 0.47: removed by 0.6 only
    acc.add("faint", 0, faint, truth)  # 0.3 -> 1, 0.6 -> 0
    acc.add("noisy", 1, noisy, truth)  # 0.3 -> 2/3, 0.6 -> 1
    chosen = acc.result().per_class["a"]
    assert chosen.params.threshold == 0.3
    assert chosen.score == pytest.approx((1 + 2 / 3) / 2)
    assert [p.threshold for p in chosen.nested_params] == [0.6, 0.3]
    assert chosen.nested_fold_scores == pytest.approx((0.0, 2 / 3))
    assert chosen.nested_score == pytest.approx(1 / 3)
    assert not chosen.stable


MIN_COMPONENTS = [0, 3, 8]


def test_component_counts_equal_removing_components_then_counting() -> None:
    from pipeline.core.level_counts import component_counts
    from pipeline.core.postprocess import binarize, quantise_threshold, remove_small_components

    for _, _, q, truth, _ in _oof(seed=4, n=6):
        levels = [quantise_threshold(t) for t in THRESHOLDS]
        got = component_counts(q, truth, levels, MIN_COMPONENTS)
        assert got.shape == (len(CLASSES), len(MIN_COMPONENTS) * len(THRESHOLDS), 2)
        for c, (m_i, m), (t_i, t) in itertools.product(
            range(len(CLASSES)), enumerate(MIN_COMPONENTS), enumerate(THRESHOLDS)
        ):
            mask = remove_small_components(binarize(q[c], t), m)
            b = m_i * len(THRESHOLDS) + t_i
            assert got[c, b].tolist() == [int(mask.sum()), int((mask & truth[c]).sum())]


def test_component_search_equals_brute_force_and_reproduces_its_choice() -> None:
    items = _oof(seed=2)
    result = _accumulate(items, min_components=MIN_COMPONENTS).result()
    gates = [("none", None)] + [
        (kind, g) for kind in ("classifier", "segmentation") for g in GATE_THRESHOLDS
    ]
    n = len(items)
    assert result.min_components == tuple(np.repeat(MIN_COMPONENTS, len(THRESHOLDS)))
    assert result.to_dict()["grid"]["min_components"] == MIN_COMPONENTS
    for c in range(len(CLASSES)):
        for (m_i, m), (t_i, t), (a_i, a) in itertools.product(
            enumerate(MIN_COMPONENTS), enumerate(THRESHOLDS), enumerate(MIN_AREAS)
        ):
            b = m_i * len(THRESHOLDS) + t_i
            for kind, g in gates:
                total = 0.0
                for _, _, q, truth, clf in items:
                    score = {
                        "none": None,
                        "classifier": clf[c],
                        "segmentation": segmentation_score(q[c], TOPK),
                    }[kind]
                    mask = postprocess_mask(q[c], t, a, m, score, g)
                    total += _kaggle_dice(mask, truth[c])
                table = result.no_gate_table if kind == "none" else result.gate_tables[kind]
                if kind == "none":
                    assert table[c, b, a_i] == pytest.approx(total / n, abs=1e-12)
                else:
                    j = GATE_THRESHOLDS.index(g)
                    assert table[c, b, a_i, 1 + j] == pytest.approx(total / n, abs=1e-12)
    for c, name in enumerate(CLASSES):
        params = result.per_class[name].params
        dice = [
            _kaggle_dice(params.apply(q[c], classifier_prob=clf[c]), truth[c])
            for _, _, q, truth, clf in items
        ]
        assert np.mean(dice) == pytest.approx(result.per_class[name].score, abs=1e-12)
    assert result.score >= _accumulate(items).result().score - 1e-12


def test_component_removal_wins_where_speckles_surround_a_true_blob() -> None:
    q = np.zeros((1, 12, 12), dtype=np.uint8)
    q[0, 3:9, 3:9] = 230
    q[0, 0, 0] = q[0, 11, 11] = q[0, 0, 11] = 255  # single-pixel false positives
    truth = (q == 230).astype(np.uint8)
    acc = GridAccumulator(
        ["a"], THRESHOLDS, MIN_AREAS, [0.5], 1, TOPK, ("none",), min_components=MIN_COMPONENTS
    )
    acc.add("x", 0, q, truth)
    chosen = acc.result().per_class["a"]
    assert chosen.params.min_component == 3 and chosen.score == 1.0
    assert chosen.params.apply(q[0]).tolist() == truth[0].tolist()


def test_component_size_ties_go_to_no_removal() -> None:
    q = np.zeros((1, 8, 8), dtype=np.uint8)
    q[0, 2:6, 2:6] = 255  # one 16-pixel component: sizes 0 and 3 give the same mask
    truth = (q > 0).astype(np.uint8)
    acc = GridAccumulator(["a"], [0.5], [0], [0.5], 1, TOPK, ("none",), min_components=[0, 3])
    acc.add("x", 0, q, truth)
    assert acc.result().per_class["a"].params.min_component == 0


def test_component_search_errors() -> None:
    with pytest.raises(ValueError, match="min_components must be integers >= 0"):
        GridAccumulator(
            CLASSES, THRESHOLDS, MIN_AREAS, GATE_THRESHOLDS, 3, TOPK, min_components=[-1]
        )
    for bad in ([[1, 2]], ["abc"], [True, 5], [float("inf")]):
        with pytest.raises(ValueError, match="min_components must be a list of integers >= 0"):
            GridAccumulator(CLASSES, THRESHOLDS, MIN_AREAS, GATE_THRESHOLDS, 3, TOPK,
                            min_components=bad)  # fmt: skip
    with pytest.raises(ValueError, match="min_components must hold at least one value"):
        GridAccumulator(CLASSES, THRESHOLDS, MIN_AREAS, GATE_THRESHOLDS, 3, TOPK, min_components=[])
    acc = GridAccumulator(
        CLASSES, THRESHOLDS, MIN_AREAS, GATE_THRESHOLDS, 3, TOPK, ("none",), min_components=[0, 5]
    )
    hist = np.zeros((1, len(CLASSES), 2, 256), dtype=np.int64)
    with pytest.raises(ValueError, match="components of 'x' must be given iff min_components"):
        acc.add_histograms(["x"], [0], hist, 81)
    with pytest.raises(ValueError, match=r"components must be \(1, 3, 12, 2\)"):
        acc.add_histograms(["x"], [0], hist, 81, components=np.zeros((1, 3, 6, 2)))

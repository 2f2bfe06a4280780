"""pipeline.ensemble on hand-made member experiments: the blend search, its honesty
checks, the members' own scores, the split check and the blended submission."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.blend import blend_levels
from pipeline.core.config import load_config
from pipeline.core.images import cache_path
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    ENSEMBLE,
    ENSEMBLE_REPORT,
    OOF_CLS,
    TEST_PROBS,
    TEST_PROBS_KEY,
)
from pipeline.core.masks import truth_masks
from pipeline.core.probstore import ProbReader, ProbWriter
from pipeline.ensemble import main
from pipeline.run.experiment import open_experiment
from pipeline.run.json_files import read_json, write_json
from pipeline.run.stored_predictions import prediction_key, write_test_keys, write_test_presence
from pipeline.tune import tune
from tests.unit.stages.test_tune import (
    CLASSES,
    IMAGE_IDS,
    ORIGINAL,
    SIZE,
    block,
    false_positive_case,
    make_experiment,
    random_case,
)

TEST_IDS = ["t0.jpg", "t1.jpg"]


def _member(config_path: Path, name: str, probs: dict, *overrides: str) -> None:
    """A second member of the hand-made experiment: its own run, the same split (the
    same data, folds and seed: ``open_experiment`` writes the identical folds.csv)."""
    config = load_config(config_path, [f"experiment={name}", *overrides])
    exp = open_experiment(config)
    for fold in range(3):
        with ProbWriter(config.fold_dir(fold) / "oof", CLASSES) as writer:
            for image_id in exp.members(fold)[1]:
                writer.add(image_id, probs[image_id].transpose(1, 2, 0))
        write_json(config.fold_dir(fold) / "metrics.json", {"fold": fold})


def _with_test_images(member_path: Path, tmp_path: Path) -> None:
    """Point the hand-made member at a test folder of its own (no sample submission)."""
    import cv2

    folder = tmp_path / "test_images"
    folder.mkdir(exist_ok=True)
    for image_id in TEST_IDS:
        cv2.imwrite(str(folder / image_id), np.zeros(ORIGINAL, np.uint8))
    body = yaml.safe_load(member_path.read_text())
    body["data"]["test_images"] = str(folder)
    body["data"]["sample_submission"] = None
    member_path.write_text(yaml.safe_dump(body))


def _complementary(tmp_path: Path) -> Path:
    """Member A predicts Fish exactly and Sugar as noise; member B the other way round."""
    truth, _, _ = random_case(seed=11)
    rng = np.random.default_rng(2)
    exact = {i: (t * 230).astype(np.uint8) for i, t in truth.items()}
    wrong = {i: rng.integers(0, 255, t.shape).astype(np.uint8) for i, t in truth.items()}
    a = {i: np.stack([exact[i][0], wrong[i][1]]) for i in IMAGE_IDS}
    b = {i: np.stack([wrong[i][0], exact[i][1]]) for i in IMAGE_IDS}
    path = make_experiment(tmp_path, truth, a, gates=["none", "segmentation"])
    _with_test_images(path, tmp_path)
    _member(path, "member_b", b)
    return path


def _ensemble_config(tmp_path: Path, member_path: Path, **extra: object) -> Path:
    path = tmp_path / "ensemble.yaml"
    body = {
        "base": str(member_path),
        "experiment": "blend",
        "ensemble": {
            "members": [
                str(member_path),
                {"config": str(member_path), "set": ["experiment=member_b"]},
            ],
            "weight_step": 0.25,
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(body))
    return path


def _test_stores(member_path: Path, tmp_path: Path, probs: dict[str, dict]) -> None:
    """Each member's test cache index and stored test probs (with fresh keys)."""
    for name, by_image in probs.items():
        config = load_config(member_path, [f"experiment={name}"])
        exp = open_experiment(config)
        cache = cache_path(exp.cache_dir, "test", config.data.image_size)
        cache.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"image_id": TEST_IDS, "height": ORIGINAL[0], "width": ORIGINAL[1]}).to_csv(
            cache / "index.csv", index=False
        )
        with ProbWriter(config.run_dir / TEST_PROBS, CLASSES, overwrite=True) as writer:
            for image_id in TEST_IDS:
                writer.add(image_id, by_image[image_id].transpose(1, 2, 0))
        write_json(config.run_dir / TEST_PROBS_KEY, {"inputs_key": prediction_key(config)})


def test_blend_takes_each_class_from_the_member_that_gets_it_right(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    member_path = _complementary(tmp_path)
    fish, sugar = (block(slice(0, 2), slice(0, 3)) * 230 for _ in range(2))
    test_a = {i: np.stack([fish, np.zeros(SIZE, np.uint8)]) for i in TEST_IDS}
    test_b = {i: np.stack([np.zeros(SIZE, np.uint8), sugar]) for i in TEST_IDS}
    _test_stores(member_path, tmp_path, {"handmade": test_a, "member_b": test_b})
    path = _ensemble_config(tmp_path, member_path)
    out = tmp_path / "blend.csv"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ensemble OOF Kaggle Dice: nested" in printed and "handmade nested" in printed
    config = load_config(path)
    record = read_json(config.run_dir / ENSEMBLE)
    # Each class leans on the member that predicts it (a blend that still scores 1.0 may
    # keep some of the other).
    assert record["weights"]["Fish"][0] > 0.5 and record["weights"]["Sugar"][1] > 0.5
    scores = record["scores"]
    assert scores["ensemble"]["in_sample"] == 1.0 and scores["ensemble"]["nested"] == 1.0
    assert scores["handmade"]["in_sample"] < 1.0 and scores["member_b"]["in_sample"] < 1.0
    assert (config.run_dir / ENSEMBLE_REPORT).read_text().count("blend") >= 1
    # Each member's columns are its own tuning: the same as tune on that member.
    own = tune(load_config(member_path)).result
    assert scores["handmade"]["nested"] == pytest.approx(own.nested_score, abs=1e-12)
    assert scores["handmade"]["in_sample"] == pytest.approx(own.score, abs=1e-12)
    # The submission blends the test probs per class: Fish from A, Sugar from B.
    frame = pd.read_csv(out, keep_default_na=False)
    assert len(frame) == len(TEST_IDS) * len(CLASSES)
    rles = dict(zip(frame["Image_Label"], frame["EncodedPixels"], strict=True))
    for image_id in TEST_IDS:
        masks = truth_masks([rles[f"{image_id}_Fish"], rles[f"{image_id}_Sugar"]], SIZE, SIZE)
        assert masks[:, :, 0].sum() == 6 and masks[:, :, 1].sum() == 6


def test_the_chosen_blend_reproduces_its_score_by_brute_force(tmp_path: Path) -> None:
    truth, probs_a, _ = random_case(seed=5)
    _, probs_b, _ = random_case(seed=6)
    member_path = make_experiment(tmp_path, truth, probs_a, gates=["none", "segmentation"])
    _with_test_images(member_path, tmp_path)
    _member(member_path, "member_b", probs_b)
    from pipeline.ensemble import choose_blend, open_members

    config = load_config(_ensemble_config(tmp_path, member_path))
    members = open_members(config)
    choice = choose_blend(config, members)
    readers = [[ProbReader(m.config.fold_dir(k) / "oof") for k in range(3)] for m in members]
    for c, name in enumerate(CLASSES):
        weights = np.array(choice.weights[name])
        params = choice.blend.per_class[name].params
        dice = []
        for k in range(3):
            for image_id in readers[0][k].image_ids:
                q = blend_levels([r[k].get(image_id) for r in readers], weights)
                mask = params.apply(q[c])
                target = truth[image_id][c]
                total = mask.sum() + target.sum()
                dice.append(1.0 if total == 0 else 2 * (mask & target).sum() / total)
        assert np.mean(dice) == pytest.approx(choice.blend.per_class[name].score, abs=1e-12)
        best_member = max(choice.members[m.name].per_class[name].score for m in members)
        assert choice.blend.per_class[name].score >= best_member - 1e-12


def test_bad_ensembles_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    member_path = _complementary(tmp_path)
    path = _ensemble_config(tmp_path, member_path)
    run_dir = load_config(path).run_dir
    # Member C trained on another split (another seed): its folds.csv differs.
    _, probs_c, _ = random_case(seed=8)
    _member(member_path, "c", probs_c, "seed=7")
    other = tmp_path / "other.yaml"
    other_members = [
        str(member_path),
        {"config": str(member_path), "set": ["experiment=c", "seed=7"]},
    ]
    other.write_text(yaml.safe_dump({"base": str(member_path), "experiment": "blend",
                                     "ensemble": {"members": other_members}}))  # fmt: skip
    assert main(["--config", str(other)]) == 2
    assert "must share one split" in capsys.readouterr().err
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({"base": str(member_path), "experiment": "blend",
                                   "ensemble": {"members": [str(member_path)]}}))  # fmt: skip
    assert main(["--config", str(one)]) == 2
    assert "at least two experiments" in capsys.readouterr().err
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump({"base": str(member_path), "experiment": "blend",
                                    "ensemble": {"members": [str(member_path)] * 2}}))  # fmt: skip
    assert main(["--config", str(same)]) == 2
    assert "'handmade' is named twice" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    members = [str(member_path), {"cfg": "x"}]
    bad.write_text(yaml.safe_dump({"base": str(member_path), "experiment": "blend",
                                   "ensemble": {"members": members}}))  # fmt: skip
    assert main(["--config", str(bad)]) == 2
    assert "'ensemble.members[1]' must be a config path" in capsys.readouterr().err
    fine = tmp_path / "fine.yaml"
    fine.write_text(yaml.safe_dump({"base": str(path), "ensemble": {"weight_step": 0.001}}))
    assert main(["--config", str(fine)]) == 2
    assert "gives 1001 blends per class" in capsys.readouterr().err
    other_data = tmp_path / "other_data.yaml"
    other_data.write_text(yaml.safe_dump({"base": str(path), "data": {"test_truth": "x.csv"}}))
    assert main(["--config", str(other_data)]) == 2
    assert "the ensemble's data.test_truth ('x.csv') differs" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    members = [str(member_path), {"config": str(member_path), "set": ["model.backbon=x"]}]
    typo.write_text(yaml.safe_dump({"base": str(path), "ensemble": {"members": members}}))
    assert main(["--config", str(typo)]) == 2
    assert "ensemble.members[1]: unknown config key 'model.backbon'" in capsys.readouterr().err
    assert main(["--config", str(path), "--out", str(tmp_path)]) == 2
    assert "is a directory; name the submission file" in capsys.readouterr().err
    assert not run_dir.exists()


def _twin(member_path: Path, probs: dict, classifier: dict | None = None) -> None:
    """``member_b``: the hand-made member's exact twin (its probs and its classifier)."""
    _member(member_path, "member_b", probs)
    if classifier is None:
        return
    config = load_config(member_path, ["experiment=member_b"])
    exp = open_experiment(config)
    for fold in range(3):
        val_ids = exp.members(fold)[1]
        path = config.fold_dir(fold, CLASSIFIER_STAGE) / OOF_CLS
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame([[i, *classifier[i]] for i in val_ids], columns=["image_id", *CLASSES])
        frame.to_csv(path, index=False)


@pytest.mark.parametrize("rule", ["always", "search"])
def test_twin_members_reproduce_tune_with_classifier_gates_and_the_rule(
    tmp_path: Path, rule: str
) -> None:
    """Two identical members blend to themselves, and their mean presence is each one's:
    the ensemble's choice, its scores and the at-least-one figures must be tune's."""
    truth, probs, classifier = random_case(seed=4)
    gates = ["none", "classifier", "segmentation", "fused"]
    member_path = make_experiment(tmp_path, truth, probs, classifier, gates=gates,
                                  at_least_one=rule)  # fmt: skip
    _with_test_images(member_path, tmp_path)
    _twin(member_path, probs, classifier)
    own = tune(load_config(member_path))
    assert own.classifier_used and "per_class" in own.at_least_one
    config = load_config(
        _ensemble_config(tmp_path, member_path, postprocess={"at_least_one": rule})
    )
    from pipeline.run.ensemble_choice import choose_blend
    from pipeline.run.ensemble_members import open_members

    choice = choose_blend(config, open_members(config))
    assert choice.presence_members == {"handmade": "classifier", "member_b": "classifier"}
    for name in CLASSES:
        assert choice.blend.per_class[name].score == pytest.approx(
            own.result.per_class[name].score, abs=1e-12
        )
        assert choice.blend.per_class[name].nested_score == pytest.approx(
            own.result.per_class[name].nested_score, abs=1e-12
        )
        assert choice.blend.per_class[name].params == own.result.per_class[name].params
    ours, theirs = choice.at_least_one, own.at_least_one
    assert ours["applied"] == theirs["applied"]
    for key in ("in_sample", "nested"):
        for which, value in theirs[key].items():
            assert ours[key][which] == pytest.approx(value, abs=1e-12), (key, which)
    assert ours["images_changed"] == theirs["images_changed"]


def _gated_stores(member_path: Path, presence: dict[str, dict[str, list[float]]]) -> None:
    """Both members' stored test probs (a confident Fish block in every image) and each
    member's stored classifier test presence (member -> image -> per class), with fresh
    keys."""
    fish = block(slice(0, 2), slice(0, 3), 230)
    test = {i: np.stack([fish, np.zeros(SIZE, np.uint8)]) for i in TEST_IDS}
    _test_stores(member_path, member_path.parent, {"handmade": test, "member_b": test})
    for name, by_image in presence.items():
        config = load_config(member_path, [f"experiment={name}"])
        values = np.array([by_image[i] for i in TEST_IDS])
        write_test_presence(config, "classifier", values, CLASSES, TEST_IDS)
        write_test_keys(config, classifier_ran=True)


def test_the_members_classifier_gate_removes_false_positives_in_the_submission(
    tmp_path: Path,
) -> None:
    """Half the images have Fish, all predict it confidently: only the members' (perfect)
    classifiers tell them apart. The ensemble gates Fish on their mean presence, and the
    submission keeps Fish only where the members' mean stored test presence clears the
    tuned gate threshold (one member alone would keep t1 as well)."""
    from pipeline.run.ensemble_choice import choose_blend
    from pipeline.run.ensemble_members import open_members

    truth, probs, classifier = false_positive_case()
    gates = ["none", "classifier"]
    member_path = make_experiment(tmp_path, truth, probs, classifier, gates=gates)
    _with_test_images(member_path, tmp_path)
    _twin(member_path, probs, classifier)
    path = _ensemble_config(tmp_path, member_path, postprocess={"at_least_one": "never"})
    config = load_config(path)
    gate = choose_blend(config, open_members(config)).blend.per_class["Fish"].params
    assert gate.gate == "classifier" and gate.gate_threshold is not None
    g = float(gate.gate_threshold)
    high = min(1.0, 2 * g - 0.01)  # t1: above the gate alone, under it in the mean with 0
    _gated_stores(
        member_path,
        {
            "handmade": {"t0.jpg": [1.0, 0.5], "t1.jpg": [high, 0.5]},
            "member_b": {"t0.jpg": [1.0, 0.5], "t1.jpg": [0.0, 0.5]},
        },
    )
    out = tmp_path / "gated.csv"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    record = read_json(config.run_dir / ENSEMBLE)
    assert record["presence"] == {"handmade": "classifier", "member_b": "classifier"}
    report = (config.run_dir / ENSEMBLE_REPORT).read_text()
    assert (
        "mean presence of handmade's classifier, member_b's classifier; chosen for Fish" in report
    )
    assert record["scores"]["ensemble"]["in_sample"] == 1.0
    rles = dict(pd.read_csv(out, keep_default_na=False).to_numpy())
    assert rles["t0.jpg_Fish"] != "" and rles["t1.jpg_Fish"] == ""


def test_the_rule_reaches_the_ensemble_submission(tmp_path: Path) -> None:
    """Every training image has Sugar, at_least_one is auto and the minimum mask area (5
    px) removes every 2x2 Sugar mask: the rule must give each test image its Sugar back."""
    truth, probs, _ = random_case(seed=9)
    for image_id in IMAGE_IDS:  # every image has Sugar
        truth[image_id][1] = block(slice(0, 2), slice(0, 2))
        probs[image_id][1] = np.maximum(probs[image_id][1], truth[image_id][1] * 220)
    grid = {"gates": ["none"], "min_areas": [5], "at_least_one": "auto"}
    member_path = make_experiment(tmp_path, truth, probs, **grid)
    _with_test_images(member_path, tmp_path)
    _twin(member_path, probs)
    small = block(slice(0, 2), slice(0, 2), 230)  # 4 px: under the minimum area
    test = {i: np.stack([np.zeros(SIZE, np.uint8), small]) for i in TEST_IDS}
    _test_stores(member_path, tmp_path, {"handmade": test, "member_b": test})
    path = _ensemble_config(tmp_path, member_path, postprocess=grid)
    out = tmp_path / "rule.csv"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    record = read_json(load_config(path).run_dir / ENSEMBLE)
    assert record["at_least_one"]["applied"] is True
    rule = record["at_least_one"]
    assert rule["nested"]["with"] > rule["nested"]["without"]
    assert record["scores"]["ensemble"]["nested"] == pytest.approx(rule["nested"]["with"])
    assert (
        "At-least-one rule (auto): applied"
        in (load_config(path).run_dir / ENSEMBLE_REPORT).read_text()
    )
    rles = dict(pd.read_csv(out, keep_default_na=False).to_numpy())
    assert all(rles[f"{i}_Sugar"] != "" for i in TEST_IDS)


def test_the_rule_on_different_members_matches_a_brute_force_nested_recomputation(
    tmp_path: Path,
) -> None:
    """Two different members, every mask removed by the minimum area: the rule restores
    one class per image. Its nested figure must be each fold's images blended with the
    weights chosen without that fold, post-processed with that fold's settings."""
    from pipeline.core.postprocess import postprocess_image
    from pipeline.run.ensemble_choice import choose_blend
    from pipeline.run.ensemble_members import open_members

    truth, probs_a, _ = random_case(seed=5)
    _, probs_b, _ = random_case(seed=6)
    grid = {"gates": ["none"], "min_areas": [0, 5], "at_least_one": "always"}
    member_path = make_experiment(tmp_path, truth, probs_a, **grid)
    _with_test_images(member_path, tmp_path)
    _member(member_path, "member_b", probs_b)
    config = load_config(_ensemble_config(tmp_path, member_path, postprocess=grid))
    members = open_members(config)
    choice = choose_blend(config, members)
    readers = [[ProbReader(m.config.fold_dir(k) / "oof") for k in range(3)] for m in members]

    def dice(mask: np.ndarray, target: np.ndarray) -> float:
        total = mask.sum() + target.sum()
        return 1.0 if total == 0 else 2 * float((mask & target).sum()) / float(total)

    nested, in_sample = [], []
    for k in range(3):
        weights = choice.row_weights(k)
        settings = [choice.blend.per_class[c].nested_params[k] for c in CLASSES]
        chosen = [choice.blend.per_class[c].params for c in CLASSES]
        for image_id in readers[0][k].image_ids:
            levels = [r[k].get(image_id) for r in readers]
            ruled = postprocess_image(blend_levels(levels, weights), settings, None, True)
            nested += [dice(ruled[c], truth[image_id][c]) for c in range(len(CLASSES))]
            q = blend_levels(levels, choice.row_weights(None))
            ruled = postprocess_image(q, chosen, None, True)
            in_sample += [dice(ruled[c], truth[image_id][c]) for c in range(len(CLASSES))]
    rule = choice.at_least_one
    assert rule["images_changed"]["nested"] > 0  # the rule did something to check
    assert rule["nested"]["with"] == pytest.approx(np.mean(nested), abs=1e-12)
    assert rule["in_sample"]["with"] == pytest.approx(np.mean(in_sample), abs=1e-12)
    # A fold's nested blend differs from the chosen one (fold 0's Sugar): the check
    # tells the nested weights from the chosen ones.
    assert any(
        not np.array_equal(choice.row_weights(k), choice.row_weights(None)) for k in range(3)
    )

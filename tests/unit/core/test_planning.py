"""The plan's rules on hand-made fingerprints, and the config text it renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.core import rle
from pipeline.core.config import CONFIG_DIR, load_config
from pipeline.core.fingerprint import measure_fingerprint
from pipeline.core.planning import candidate_sizes, plan_choices, render_config

CPU = {"cores": 2, "memory_available_gb": 8.0, "gpu": None, "bf16": False}


def fingerprint(presence: list[float], p5: float = 400, p50: float = 2000, empty: float = 0.0):
    return {
        "images": {"count": 300, "height_p50": 160, "width_p50": 240},
        "classes": {
            f"c{i}": {
                "presence": p,
                "area_p5": p5,
                "area_p50": p50,
                "area_fraction_p5": p5 / (160 * 240),
                "area_fraction_p50": p50 / (160 * 240),
            }
            for i, p in enumerate(presence)
        },
        "empty_pair_share": empty,
        "overlap_share": 0.0,
    }


def step(s_per_step: float = 0.4) -> dict:
    return {"batch": 4, "s_per_step": s_per_step, "bytes_per_image": 50 * 2**20, "backbone": "b"}


def test_size_keeps_aspect_in_multiples_of_32() -> None:
    image, crop = candidate_sizes(fingerprint([0.5]), CPU)
    assert image.value == [64, 96] and crop.value == [64, 64]
    gpu = candidate_sizes(fingerprint([0.5]), {**CPU, "gpu": "H100"})[0]
    assert gpu.value == [160, 256]  # the images own size, sides rounded to 32 (240 -> 256)


def test_small_objects_grow_the_size() -> None:
    image, _ = candidate_sizes(fingerprint([0.5], p5=20), CPU)
    assert image.value[1] > 96 and "5th-percentile object" in image.reason
    assert all(side % 32 == 0 for side in image.value)


def choice(choices, key):
    return next(c for c in choices if c.key == key)


def test_rules_follow_the_fingerprint() -> None:
    sizes = candidate_sizes(fingerprint([1.0]), CPU)
    even = plan_choices(fingerprint([1.0]), CPU, step(), sizes, 1.0, 3, None)
    assert choice(even, "folds.method").value == "kfold"
    assert choice(even, "postprocess.gates").value == ["none", "segmentation"]
    uneven = plan_choices(fingerprint([0.9, 0.3], empty=0.4), CPU, step(), sizes, 1.0, 3, None)
    assert choice(uneven, "folds.method").value == "multilabel_stratified"
    assert "classifier" in choice(uneven, "postprocess.gates").value
    # Epochs: 200 training images x 0.1 s x 1.35 per epoch and fold; small crops on 2 CPU
    # cores train as two single-thread fold processes, so 3 folds take 2 waves; 60% of 1 h.
    assert choice(even, "train.parallel_folds").value == 2
    assert choice(even, "train.epochs").value == int(3600 * 0.6 // (200 * 0.1 * 1.35 * 2))
    # One process per fold on a GPU: 3 waves at the quiet wall time, and each fold's
    # first-epoch tracing (2 probe warm-ups) comes off the budget first.
    traced = {**step(), "s_first_step": 30.0}
    gpu = {**CPU, "gpu": "H100", "gpu_memory_gb": 80}
    one = plan_choices(fingerprint([1.0]), gpu, traced, sizes, 1.0, 3, None)
    assert choice(one, "train.parallel_folds").value == 1
    expected = int((3600 * 0.6 - 3 * 60) // (200 * 0.1 * 1.35 * 3))
    assert choice(one, "train.epochs").value == expected
    assert "60 s of tracing" in choice(one, "train.epochs").reason
    # Two fold processes are charged the step's CPU time (one core each), not its wall.
    busy = {**step(), "s_per_step_cpu": 0.8}
    cpu_bound = plan_choices(fingerprint([1.0]), CPU, busy, sizes, 1.0, 3, None)
    assert choice(cpu_bound, "train.epochs").value == int(3600 * 0.6 // (200 * 0.2 * 1.35 * 2))
    slow = plan_choices(fingerprint([1.0]), CPU, step(40.0), sizes, 1.0, 3, None)
    assert choice(slow, "train.epochs").value == 3  # clamped
    batch = choice(even, "train.batch_size").value
    assert batch * choice(even, "train.accumulation_steps").value >= 16


def test_exclusive_classes_plan_softmax_and_overlapping_ones_sigmoid(tmp_path: Path) -> None:
    sizes = candidate_sizes(fingerprint([0.7, 0.4]), CPU)
    exclusive = {**fingerprint([0.7, 0.4]), "overlapping_images": 0}
    choices = plan_choices(exclusive, CPU, step(), sizes, 0.5, 3, None)
    assert choice(choices, "model.activation").value == "softmax"
    assert not [c for c in choices if c.key == "train.loss"]  # softmax has its own loss
    text = render_config(
        choices,
        {"base": str(CONFIG_DIR / "default.yaml"), "experiment": "x", "data.classes": ["c0", "c1"]},
        ["planned"],
    )
    (tmp_path / "x.yaml").write_text(text)
    assert load_config(tmp_path / "x.yaml").model.activation == "softmax"
    overlapping = {**fingerprint([0.7, 0.4]), "overlapping_images": 3, "overlap_share": 0.01}
    sigmoid = plan_choices(overlapping, CPU, step(), sizes, 0.5, 3, None)
    assert choice(sigmoid, "model.activation").value == "sigmoid"
    assert "overlap in 3 images" in choice(sigmoid, "model.activation").reason
    single = plan_choices(
        {**fingerprint([0.7]), "overlapping_images": 0}, CPU, step(), sizes, 0.5, 3, None
    )
    assert choice(single, "model.activation").value == "sigmoid"


def test_rendered_config_loads_with_a_reason_per_key(tmp_path: Path) -> None:
    sizes = candidate_sizes(fingerprint([0.7]), CPU)
    choices = plan_choices(fingerprint([0.7], empty=0.3), CPU, step(), sizes, 0.5, 3, [80, 120])
    text = render_config(
        choices,
        {"base": str(CONFIG_DIR / "default.yaml"), "experiment": "x", "data.classes": ["c0"]},
        ["planned"],
    )
    path = tmp_path / "x.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.data.image_size == sizes[0].value
    assert config.postprocess.min_components[0] == 0
    keyed = [line for line in text.splitlines() if line.startswith("  ") and ":" in line]
    assert all("  # " in line or line.lstrip().startswith("#") for line in keyed[1:])
    assert yaml.safe_load(text)["train"]["epochs"] == choice(choices, "train.epochs").value
    assert [t["name"] for t in config.augment] == ["HorizontalFlip", "VerticalFlip"]
    assert "Affine" in next(line for line in text.splitlines() if line.startswith("augment:"))


def test_fingerprint_of_hand_made_masks(tmp_path: Path) -> None:
    for name in ("a", "b"):
        Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / f"{name}.png")
    one = np.zeros((10, 20), np.uint8)
    one[0:2, 0:2] = 1  # an object of 4 px
    one[5:8, 5:8] = 1  # and one of 9 px
    two = np.zeros((10, 20), np.uint8)
    two[0, 0] = 1  # overlaps class x in image a
    table = pd.DataFrame(
        [("a", "x", rle.encode(one)), ("a", "y", rle.encode(two)), ("b", "x", ""), ("b", "y", "")],
        columns=["image_id", "class_name", "rle"],
    )
    got = measure_fingerprint(table, ["x", "y"], tmp_path)
    assert got["images"]["height_p50"] == 10 and got["images"]["channels"] == {"3": 2}
    assert got["classes"]["x"]["presence"] == 0.5
    assert got["classes"]["x"]["area_p50"] == pytest.approx(6.5)
    assert got["classes"]["x"]["components_p50"] == 2
    assert got["empty_pair_share"] == 0.5 and got["empty_image_share"] == 0.5
    assert got["overlap_share"] == 0.5
    assert got["overlapping_images"] == 1  # image a, from every image's runs


def test_the_report_shows_a_planned_configs_fingerprint(tmp_path: Path) -> None:
    from pipeline.core.fingerprint import fingerprint_path, fingerprint_tables
    from pipeline.run.report_sections import plan_section

    config_path = tmp_path / "mine.yaml"
    config_path.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "default.yaml")}))
    config = load_config(config_path)
    assert plan_section(config) is None  # not planned: no section
    print_ = {**fingerprint([0.5, 0.2]), "empty_image_share": 0.1}
    print_["images"].update(height_range=[1, 2], width_range=[3, 4], distinct_sizes=2, channels={})
    record = {"fingerprint": print_, "machine": CPU, "hours": 1.0, "choices": []}
    record["choices"] = [{"key": "train.epochs", "value": 7, "reason": "why"}]
    fingerprint_path(config_path).write_text(json.dumps(record))
    assert fingerprint_path(config_path).name == "mine.fingerprint.json"
    _lines, per_class, choices = fingerprint_tables(record)
    assert per_class["class"].tolist() == ["c0", "c1"] and choices["reason"].tolist() == ["why"]
    section = plan_section(config)
    assert section is not None and "300 training images" in " ".join(section.paragraphs)

"""The export stage and the bundle runner on a tiny model (real CLIs, real files).

A run directory is made without training (random weights saved as each fold's best,
a hand-written ``postprocess.json``): what export reads of a trained run, in seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest

from pipeline.core.bundle import MANIFEST, read_manifest
from pipeline.core.config import load_config
from pipeline.core.layout import BEST_WEIGHTS, FOLD_METRICS, FOLDS, POSTPROCESS
from pipeline.core.postprocess import PostprocessParams, save_postprocess
from pipeline.core.submission import score_submission
from pipeline.core.submission_check import read_submission
from tests.conftest import REPO, write_tiny_config
from tests.integration.test_bundle_runner import run_entry

CLASSES = ["Fish", "Flower", "Gravel", "Sugar"]
SMALL = {"backbone": "resnet18", "encoder_weights": None, "decoder_filters": [16, 8, 8, 8, 8]}
FORMATS = "savedmodel,openvino,onnx"  # every supported format
pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def make_run(tmp: Path, tiny_data: Path) -> Path:
    """A tiny config and its run directory: 2 folds of random weights, tuned settings."""
    # The smallest decoder: the test is about the files, not the network.
    config_path = write_tiny_config(tmp, tiny_data, model=SMALL)
    config = load_config(config_path)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.core.config import load_config\n"
        "from pipeline.nn.engines import build_prediction_model\n"
        "from pipeline.nn.weights import save_weights_atomic\n"
        "config = load_config(sys.argv[1])\n"
        "model = build_prediction_model(config, 4)\n"
        "for fold in range(2):\n"
        "    model.set_weights([w * (1 + 0.1 * fold) for w in model.get_weights()])\n"
        f"    save_weights_atomic(model, config.fold_dir(fold) / {BEST_WEIGHTS!r})\n"
    )
    done = run_cli("-c", code, str(config_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for fold in range(2):
        (config.fold_dir(fold) / FOLD_METRICS).write_text(json.dumps({"n_val": 9}))
    ids = pd.read_csv(tiny_data / "train.csv")["Image_Label"].str.split("_").str[0].unique()
    pd.DataFrame({"image_id": ids, "fold": [i % 2 for i in range(len(ids))]}).to_csv(
        config.run_dir / FOLDS, index=False
    )
    params = {name: PostprocessParams(threshold=0.5, min_area=10) for name in CLASSES}
    scores = {"tuned": 0.61, "tuned_nested": 0.58}
    save_postprocess(config.run_dir / POSTPROCESS, params, {"scores": scores, "size": [40, 60]})
    return config_path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A tiny run exported in both formats by the real CLI."""
    tmp = tmp_path_factory.mktemp("export")
    config = make_run(tmp, tiny_data)
    done = run_cli(
        "-m", "pipeline.export", "--config", str(config), "--out", str(tmp / "bundle"),
        "--formats", FORMATS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bundle:" in done.stdout
    return tmp / "bundle"


def test_exporting_twice_gives_identical_members(exported, tmp_path):
    config = exported.parent / "tiny.yaml"
    again = tmp_path / "again"
    done = run_cli(
        "-m", "pipeline.export", "--config", str(config), "--out", str(again), "--formats", FORMATS
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((exported / MANIFEST).read_text())
    second = json.loads((again / MANIFEST).read_text())
    assert first == second
    assert "savedmodel/segmentation_fold1/saved_model.pb" in first["members"]
    assert "openvino/segmentation_fold1.bin" in first["members"]
    assert "onnx/segmentation_fold1.onnx" in first["members"]
    assert first["input"]["image_channels"] == [1, 3, 4]
    assert first["cv"]["oof_kaggle_dice_nested"] == 0.58
    assert first["cv"]["oof_kaggle_dice_in_sample"] == 0.61
    assert first["plan"]["classes"] == CLASSES and first["input"]["size"] == [32, 64]
    assert read_manifest(again).formats == ["savedmodel", "openvino", "onnx"]
    requirements = (again / "runner" / "requirements.txt").read_text()
    assert "openvino==" in requirements and "onnxruntime==" in requirements
    assert "tensorflow" not in requirements
    # An existing output is refused, naming it; nothing changes.
    done = run_cli("-m", "pipeline.export", "--config", str(config), "--out", str(again))
    assert done.returncode == 2 and f"bundle folder '{again}' is an existing" in done.stderr


def test_every_engine_agrees_with_pipeline_predict(exported, tiny_data, tmp_path):
    """The bundle on OpenVINO and onnxruntime (no TensorFlow imported) and on TensorFlow
    (the SavedModel) against pipeline.predict on the same folds: same rows, near-identical
    masks; and pipeline.predict on onnxruntime likewise."""
    config = exported.parent / "tiny.yaml"
    sample = tiny_data / "sample_submission.csv"
    images = tiny_data / "test_images"
    common = ("--images", images, "--sample-submission", sample, "--precision", "float32")
    outputs = {}
    for engine in ("openvino", "onnxruntime", "tensorflow"):
        out = tmp_path / f"{engine}.csv"
        masks = ("--masks", tmp_path / f"{engine}_masks")
        done = run_entry(
            "pipeline.run_bundle", "--bundle", exported, "--engine", engine, "--out", out,
            *common, *masks,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        imported_tf = "FRAMEWORK MODULES: []" not in done.stdout
        assert imported_tf == (engine == "tensorflow")
        outputs[engine] = out
    reference = tmp_path / "predict.csv"
    done = run_cli(
        "-m", "pipeline.predict", "--config", str(config), "--out", str(reference),
        "--submissions-dir", str(tmp_path / "subs"), "--set", "predict.precision=float32",
        "--set", "predict.engine=tensorflow", "--masks", str(tmp_path / "predict_masks"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outputs["predict_onnxruntime"] = tmp_path / "predict_onnx.csv"
    done = run_cli(
        "-m", "pipeline.predict", "--config", str(config), "--out",
        str(outputs["predict_onnxruntime"]), "--submissions-dir", str(tmp_path / "subs"),
        "--set", "predict.precision=float32", "--set", "predict.engine=onnxruntime",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = read_submission(reference)
    for engine, out in outputs.items():
        written = read_submission(out)
        assert list(written["Image_Label"]) == list(expected["Image_Label"]), engine
        assert kaggle_dice(written, expected) >= 0.995, engine

    # Folder mode of pipeline.predict: the same files as the bundle's, at the images' sizes.
    folder = tmp_path / "predict_masks"
    names = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    assert len(names) == 6 * len(CLASSES)
    for name in names:
        theirs = cv2.imread(str(folder / name), cv2.IMREAD_UNCHANGED)
        ours = cv2.imread(str(tmp_path / "openvino_masks" / name), cv2.IMREAD_UNCHANGED)
        assert theirs.shape == ours.shape == (64, 96)


def kaggle_dice(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Kaggle Dice of one submission scored against another as its truth."""
    return float(score_submission(a, b, "image_label", CLASSES, (40, 60))["overall"])


def test_predict_refuses_an_image_of_another_channel_count(exported, tiny_data, tmp_path):
    from tests.unit.core.test_images import odd_channel_images

    config = exported.parent / "tiny.yaml"
    folder = tmp_path / "images"
    shutil.copytree(tiny_data / "test_images", folder)
    said = odd_channel_images(tmp_path)["b5.tif"]
    shutil.copyfile(tmp_path / "b5.tif", folder / "b5.tif")
    out, masks = tmp_path / "predict.csv", tmp_path / "masks"
    done = run_cli(
        "-m", "pipeline.predict", "--config", str(config), "--out", str(out),
        "--submissions-dir", str(tmp_path / "subs"), "--masks", str(masks),
        "--set", f"data.test_images={folder}", "--set", "data.sample_submission=null",
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"image file '{folder / 'b5.tif'}' has {said}; expected 1 (gray)" in done.stderr
    assert not out.exists() and not masks.exists() and not (tmp_path / "subs").exists()

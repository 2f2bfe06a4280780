"""The bundle runner on a hand-made OpenVINO bundle (no TensorFlow anywhere, seconds).

The networks are tiny OpenVINO graphs built here (a 1x1 convolution and a sigmoid per
fold); the manifest, runner copy and checksums are written by the same code as
``pipeline.export``. ``test_export.py`` exports a real Keras model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INPUT,
    MANIFEST,
    list_members,
    read_manifest,
)
from pipeline.core.postprocess import PostprocessParams
from pipeline.core.prediction_plan import PredictionPlan
from pipeline.core.submission_check import read_submission
from pipeline.run.bundle_files import write_runner
from pipeline.run.bundle_run import run_bundle
from tests.conftest import REPO

ov = pytest.importorskip("openvino")

CLASSES = ["Fish", "Flower", "Gravel", "Sugar"]
FRAMEWORKS = ("tensorflow", "keras", "tf_keras")
# Runs a runner entry as a command, then prints which framework modules it imported.
PROBE = (
    "import runpy, sys\n"
    "entry = sys.argv.pop(1)\n"
    "sys.argv[0] = entry\n"
    "code = 0\n"
    "try:\n"
    "    if entry.endswith('.py'):\n"
    "        runpy.run_path(entry, run_name='__main__')\n"
    "    else:\n"
    "        runpy.run_module(entry, run_name='__main__')\n"
    "except SystemExit as done:\n"
    "    code = done.code\n"
    f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
    "print('FRAMEWORK MODULES:', bad)\n"
    "print('RUNNER FROM:', sys.modules['pipeline'].__file__)\n"
    "sys.exit(code)\n"
)


def run_entry(entry: str, *args: object, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``entry`` (a module or a script) as a process, through ``PROBE``."""
    command = [sys.executable, "-c", PROBE, entry, *(str(a) for a in args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)


def tiny_network(path: Path, fold: int) -> None:
    """(N, H, W, 3) float32 0-255 -> sigmoid of one colour channel per class (N, H, W, 4)."""
    from openvino import opset13 as ops

    images = ops.parameter([-1, -1, -1, 3], np.float32, name="images")
    nchw = ops.transpose(images, ops.constant(np.array([0, 3, 1, 2], dtype=np.int64)))
    weights = np.zeros((4, 3, 1, 1), dtype=np.float32)
    for k in range(4):
        weights[k, k % 3] = (1.0 + 0.2 * fold) / 20.0
    conv = ops.convolution(nchw, ops.constant(weights), [1, 1], [0, 0], [0, 0], [1, 1])
    shifted = ops.add(conv, ops.constant(np.full((1, 4, 1, 1), -128 / 20.0, dtype=np.float32)))
    masks = ops.transpose(ops.sigmoid(shifted), ops.constant(np.array([0, 2, 3, 1], np.int64)))
    ov.save_model(ov.Model([masks], [images]), str(path), compress_to_fp16=False)


def tiny_onnx(path: Path, fold: int) -> None:
    """``tiny_network``'s graph as ONNX (opset 17), built with onnx's helpers."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = np.zeros((4, 3, 1, 1), dtype=np.float32)
    for k in range(4):
        weights[k, k % 3] = (1.0 + 0.2 * fold) / 20.0
    bias = np.full(4, -128 / 20.0, dtype=np.float32)
    nodes = [
        helper.make_node("Transpose", ["images"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["conv"]),
        helper.make_node("Sigmoid", ["conv"], ["prob"]),
        helper.make_node("Transpose", ["prob"], ["masks"], perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["n", "h", "w", 4])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def write_bundle(
    folder: Path, size: tuple[int, int] | None = (40, 60), network_format: str = "openvino"
) -> Path:
    """A two-fold OpenVINO (or ONNX) bundle with the runner's copy, checksummed."""
    plan = PredictionPlan(
        classes=tuple(CLASSES),
        input_size=(32, 64),
        views=("identity", "hflip"),
        merge="mean",
        batch_size=4,
        postprocess={name: PostprocessParams(threshold=0.5, min_area=5) for name in CLASSES},
        at_least_one=False,
        gate_source=None,
        csv_format="image_label",
        submission_size=size,
    )
    (folder / network_format).mkdir(parents=True)
    suffix = {"openvino": ".xml", "onnx": ".onnx"}[network_format]
    files = [f"{network_format}/segmentation_fold{k}{suffix}" for k in range(2)]
    for fold, member in enumerate(files):
        (tiny_network if network_format == "openvino" else tiny_onnx)(folder / member, fold)
    write_runner(folder / "runner", [network_format])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": plan.to_dict(),
        "input": {**INPUT, "size": [32, 64]},
        "id_style": "names",
        "precision": "auto",
        "networks": {network_format: {"segmentation": files}},
        "members": list_members(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def mixed_folder(folder: Path) -> dict[str, tuple[int, int]]:
    """Three images of different sizes and kinds (RGB JPEG, gray PNG, RGBA PNG)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.jpg": (37, 53), "b.png": (64, 96), "c.png": (100, 30)}
    for name, (h, w) in sizes.items():
        channels = {"a.jpg": 3, "b.png": 1, "c.png": 4}[name]
        image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        cv2.imwrite(str(folder / name), image if channels > 1 else image[:, :, 0])
    return sizes


def test_the_runner_writes_a_submission_and_masks_without_tensorflow(bundle, tiny_data, tmp_path):
    out, masks, overlays = tmp_path / "sub.csv", tmp_path / "masks", tmp_path / "overlays"
    done = run_entry(
        "pipeline.run_bundle",
        "--bundle", bundle, "--images", tiny_data / "test_images", "--out", out,
        "--sample-submission", tiny_data / "sample_submission.csv",
        "--truth", tiny_data / "test_truth.csv", "--masks", masks, "--overlays", overlays,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FRAMEWORK MODULES: []" in done.stdout
    assert "test Kaggle Dice:" in done.stdout and "on openvino" in done.stdout
    sample = read_submission(tiny_data / "sample_submission.csv")
    written = read_submission(out)
    assert list(written["Image_Label"]) == list(sample["Image_Label"])
    images = sorted(p.name for p in (tiny_data / "test_images").iterdir())
    for name in CLASSES:
        pngs = sorted((masks / name).iterdir())
        assert [p.stem for p in pngs] == [Path(i).stem for i in images]
        for png, image in zip(pngs, images, strict=True):
            mask = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            picture = cv2.imread(str(tiny_data / "test_images" / image))
            assert mask.shape == picture.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert len(list(overlays.iterdir())) == len(images)


def test_folder_mode_writes_masks_at_each_images_own_size(bundle, tmp_path):
    sizes = mixed_folder(tmp_path / "photos")
    result = run_bundle(bundle, tmp_path / "photos", masks=tmp_path / "masks")
    assert result["n_images"] == 3 and result["engine"] == "openvino"
    for name in CLASSES:
        for image, (h, w) in sizes.items():
            mask = cv2.imread(str(tmp_path / "masks" / name / f"{Path(image).stem}.png"), 0)
            assert mask.shape == (h, w)
    # The masks agree with the submission's at the manifest's size, resized back.
    own = write_bundle(tmp_path / "own", size=None)
    run_bundle(own, tmp_path / "photos", out=tmp_path / "own.csv", masks=tmp_path / "own_masks")
    from pipeline.core.rle import decode

    rows = read_submission(tmp_path / "own.csv").set_index("Image_Label")["EncodedPixels"]
    for image, (h, w) in sizes.items():
        for name in CLASSES:
            mask = cv2.imread(str(tmp_path / "own_masks" / name / f"{Path(image).stem}.png"), 0)
            np.testing.assert_array_equal(decode(rows[f"{image}_{name}"], (h, w)) * 255, mask)


def test_the_bundles_own_runner_copy_runs_from_another_folder(bundle, tiny_data, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "attached")
    requirements = (copy / "runner" / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in requirements] == [
        "numpy", "opencv-python-headless", "pandas", "openvino"
    ]  # fmt: skip
    out = tmp_path / "submission.csv"
    done = run_entry(
        str(copy / "runner" / "run_bundle.py"),
        "--bundle", copy, "--images", tiny_data / "test_images", "--out", out,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FRAMEWORK MODULES: []" in done.stdout
    assert f"RUNNER FROM: {copy / 'runner' / 'pipeline' / '__init__.py'}" in done.stdout
    assert len(read_submission(out)) == 6 * len(CLASSES)


def test_an_onnx_bundle_runs_on_onnxruntime_without_tensorflow(bundle, tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_bundle = write_bundle(tmp_path / "onnx_bundle", network_format="onnx")
    requirements = (onnx_bundle / "runner" / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in requirements] == [
        "numpy", "opencv-python-headless", "pandas", "onnxruntime"
    ]  # fmt: skip
    sample, images = tiny_data / "sample_submission.csv", tiny_data / "test_images"
    out = tmp_path / "onnx.csv"
    # bfloat16 asked for: onnxruntime computes the exported float32 graph, and says so.
    done = run_entry(
        str(onnx_bundle / "runner" / "run_bundle.py"), "--bundle", onnx_bundle,
        "--images", images, "--sample-submission", sample, "--out", out,
        "--precision", "bfloat16", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FRAMEWORK MODULES: []" in done.stdout and "on onnxruntime (float32" in done.stdout
    # The same graph on OpenVINO in float32: the same rows and masks.
    reference = run_bundle(bundle, images, tmp_path / "ov.csv", None, None, sample, None,
                           "openvino", "float32")  # fmt: skip
    assert reference["engine"] == "openvino"
    from pipeline.core.submission import score_submission

    ours, theirs = read_submission(out), read_submission(tmp_path / "ov.csv")
    assert list(ours["Image_Label"]) == list(theirs["Image_Label"])
    dice = score_submission(ours, theirs, "image_label", CLASSES, (40, 60), "onnx", "openvino")
    assert dice["overall"] >= 0.995
    with pytest.raises(ValueError, match="holds \\['onnx'\\], which engine 'openvino'"):
        run_bundle(onnx_bundle, images, tmp_path / "no.csv", engine="openvino")
    assert not (tmp_path / "no.csv").exists()


def damage(bundle: Path, tmp_path: Path, how: str) -> Path:
    broken = shutil.copytree(bundle, tmp_path / f"broken_{how}")
    manifest = json.loads((broken / MANIFEST).read_text())
    if how == "missing":
        (broken / "openvino" / "segmentation_fold1.bin").unlink()
    elif how == "checksum":
        with (broken / "openvino" / "segmentation_fold0.bin").open("r+b") as handle:
            handle.seek(10)
            handle.write(b"\x01\x02\x03")
    elif how == "newer":
        manifest["format_version"] = FORMAT_VERSION + 1
        (broken / MANIFEST).write_text(json.dumps(manifest))
    elif how == "no_manifest":
        (broken / MANIFEST).unlink()
    return broken


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", r"segmentation_fold1.bin' is missing: a partial bundle"),
        ("checksum", r"segmentation_fold0.bin' does not match its SHA-256"),
        ("newer", r"manifest.json has format_version 2; this runner reads up to 1"),
        ("no_manifest", r"has no manifest.json"),
    ],
)
def test_a_damaged_bundle_is_refused_before_anything_is_written(
    bundle, tiny_data, tmp_path, how, message
):
    broken = damage(bundle, tmp_path, how)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_manifest(broken)
    out = tmp_path / "out.csv"
    done = run_entry(
        "pipeline.run_bundle", "--bundle", broken, "--images", tiny_data / "test_images",
        "--out", out, "--masks", tmp_path / "masks",
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(broken) in done.stderr
    assert not out.exists() and not (tmp_path / "masks").exists()


def test_bad_inputs_exit_2_naming_the_file_and_write_nothing(bundle, tiny_data, tmp_path):
    out, masks = tmp_path / "out.csv", tmp_path / "masks"

    def refused(images: Path, sample: Path | None = None) -> str:
        """The message of the bad-input error (exit 2 in a command) of a run."""
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            run_bundle(bundle, images, out, masks, sample_submission=sample)
        assert not out.exists() and not masks.exists()
        return str(error.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"image folder '{empty}' holds no image files" in refused(empty)
    assert f"image folder '{tmp_path / 'nowhere'}' is not found" in refused(tmp_path / "nowhere")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_data / "test_images", corrupt)
    victim = sorted(corrupt.iterdir())[2]
    victim.write_bytes(b"not an image")
    assert f"{victim}' (12 bytes) could not be decoded" in refused(corrupt)

    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_data / "test_images", fewer)
    sorted(fewer.iterdir())[0].unlink()
    sample = tiny_data / "sample_submission.csv"
    stderr = refused(fewer, sample)
    assert f"sample submission '{sample}' lists 1 image(s) that the folder" in stderr

    existing = tmp_path / "existing.csv"
    existing.write_text("keep me")
    done = run_entry(
        "pipeline.run_bundle", "--bundle", bundle, "--images", tiny_data / "test_images",
        "--out", existing,
    )  # fmt: skip
    assert done.returncode == 2 and f"submission '{existing}' is an existing file" in done.stderr
    assert existing.read_text() == "keep me"
    with pytest.raises(FileExistsError, match="mask folder .* is an existing file"):
        run_bundle(bundle, tiny_data / "test_images", masks=existing)


@pytest.mark.parametrize("name", ["la.tif", "b5.tif"])
def test_images_of_another_channel_count_exit_2_naming_the_file(bundle, tiny_data, tmp_path, name):
    from tests.unit.core.test_images import odd_channel_images

    assert read_manifest(bundle).image_channels == (1, 3, 4)
    odd = tmp_path / "odd"
    odd.mkdir()
    said = odd_channel_images(odd)[name]
    folder = tmp_path / "images"
    shutil.copytree(tiny_data / "test_images", folder)
    shutil.copyfile(odd / name, folder / name)
    out, masks = tmp_path / "out.csv", tmp_path / "masks"
    done = run_entry(
        "pipeline.run_bundle", "--bundle", bundle, "--images", folder, "--out", out,
        "--masks", masks,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    expected = f"image file '{folder / name}' has {said}; expected 1 (gray), 3 (RGB), 4 (RGBA)"
    assert expected in done.stderr
    assert not out.exists() and not masks.exists()

"""Bad input, every CLI: exit code 2, one message naming the file, row or key and what
was expected, no traceback, and nothing created or changed on disk.

Each case builds its inputs in a fresh folder, snapshots every file under it, calls the
CLI's ``main`` in this process (the same function ``python -m`` runs; a few cases also
run as real subprocesses at the end), and checks the exit code, the words of the
message, that no exception escaped, and the snapshot.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.layout import OOF
from pipeline.core.probstore import ProbWriter
from pipeline.run.command import setup_logging
from pipeline.run.fold_records import record_trained_config
from pipeline.run.json_files import write_json
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


@dataclass
class Case:
    """``prepare(tmp, data) -> argv`` for ``pipeline.<cli>``; ``words`` must all appear
    in the message; ``allow``: path parts that may change (caches made before the
    problem was found)."""

    cli: str
    prepare: Callable[[Path, Path], list[str]]
    words: tuple[str, ...]
    allow: tuple[str, ...] = field(default=())


def tiny(tmp: Path, tiny_set: Path, **sections: dict) -> str:
    return str(write_tiny_config(tmp, tiny_set, **sections))


def own_data(tmp: Path, data: Path) -> Path:
    """A private copy of the tiny data set, to damage."""
    copy = tmp / "data"
    shutil.copytree(data, copy)
    return copy


def edit_csv(tmp: Path, data: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> str:
    copy = own_data(tmp, data)
    frame = pd.read_csv(copy / "train.csv", dtype=str, keep_default_na=False)
    change(frame).to_csv(copy / "train.csv", index=False)
    return str(write_tiny_config(tmp, copy))


def fake_trained_run(tmp: Path, data: Path, folds: tuple[int, ...] = (0, 1)) -> str:
    """A run whose folds look finished (metrics.json, recorded config, a weights file)
    without training: enough for the checks that come before any model is used."""
    config_path = write_tiny_config(tmp, data)
    from pipeline.core.config import load_config
    from pipeline.run.experiment import open_experiment

    config = load_config(config_path)
    exp = open_experiment(config)  # the split and the mask table, as training leaves them
    for fold in folds:
        fold_dir = config.fold_dir(fold)
        with ProbWriter(fold_dir / OOF, exp.classes) as store:  # the fold's OOF store
            store.add(exp.members(fold)[1][0], np.zeros((4, 6, len(exp.classes)), np.float32))
        write_json(
            fold_dir / "metrics.json", {"fold": fold, "n_val": 9, "oof_kaggle_dice_050": 0.5}
        )
        record_trained_config(config, fold_dir)
        h5py.File(fold_dir / "best_weights.h5", "w").close()  # a readable, empty HDF5
    return str(config_path)


def header_only(tmp: Path, data: Path) -> list[str]:
    return ["--config", edit_csv(tmp, data, lambda f: f.iloc[:0]), "--fold", "0"]


def row_without_image(tmp: Path, data: Path) -> list[str]:
    def add(frame: pd.DataFrame) -> pd.DataFrame:
        extra = pd.DataFrame({"Image_Label": ["ghost.jpg_Fish"], "EncodedPixels": ["1 3"]})
        return pd.concat([frame, extra], ignore_index=True)

    return ["--config", edit_csv(tmp, data, add), "--fold", "0"]


def set_rle(rle: str) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, data: Path) -> list[str]:
        def change(frame: pd.DataFrame) -> pd.DataFrame:
            frame.loc[1, "EncodedPixels"] = rle
            return frame

        return ["--config", edit_csv(tmp, data, change), "--fold", "0"]

    return prepare


def image_smaller_than_its_rle(tmp: Path, data: Path) -> list[str]:
    import cv2

    copy = own_data(tmp, data)
    frame = pd.read_csv(copy / "train.csv", dtype=str, keep_default_na=False)
    filled = frame[frame["EncodedPixels"] != ""].iloc[0]
    image = filled["Image_Label"].rpartition("_")[0]
    cv2.imwrite(str(copy / "train_images" / image), np.zeros((8, 8, 3), np.uint8))
    return ["--config", str(write_tiny_config(tmp, copy)), "--fold", "0"]


def csv_change(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[..., list[str]]:
    return lambda tmp, data: ["--config", edit_csv(tmp, data, change), "--fold", "0"]


def yaml_file(text: str, *rest: str) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, data: Path) -> list[str]:
        path = tmp / "bad.yaml"
        path.write_text(text)
        return ["--config", str(path), *rest]

    return prepare


def with_sets(*sets: str, fold: str | None = "0", **sections: dict) -> Callable[..., list[str]]:
    def prepare(tmp: Path, data: Path) -> list[str]:
        argv = ["--config", tiny(tmp, data, **sections)]
        for item in sets:
            argv += ["--set", item]
        return argv + (["--fold", fold] if fold is not None else [])

    return prepare


def damaged_state(tmp: Path, data: Path) -> list[str]:
    config = fake_trained_run(tmp, data, folds=(1,))
    checkpoint = tmp / "runs" / "tiny" / "fold_0" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"epoch": ')
    return ["--config", config, "--fold", "0", "--resume"]


def trained_then(change: Callable[[Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, data: Path) -> list[str]:
        config = fake_trained_run(tmp, data)
        return ["--config", config, *change(tmp / "runs" / "tiny")]

    return prepare


def damaged_metrics(run: Path) -> list[str]:
    (run / "fold_1" / "metrics.json").write_text('{"fold": 1, "n_v')
    return ["--no-postprocess"]


def truncated_weights(run: Path) -> list[str]:
    (run / "fold_1" / "best_weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    return ["--no-postprocess"]


def damaged_postprocess(run: Path) -> list[str]:
    (run / "postprocess.json").write_text("{not json")
    return []


def sample_lists_a_missing_image(tmp: Path, data: Path) -> list[str]:
    copy = own_data(tmp, data)
    first = sorted((copy / "test_images").iterdir())[0]
    first.unlink()
    config = fake_trained_run(tmp, copy)
    return ["--config", config, "--no-postprocess"]


def grid_args(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, data: ["--config", tiny(tmp, data), *extra]


CASES: dict[str, Case] = {
    # Config files and --set, through train.
    "train: config file missing": Case(
        "train",
        lambda t, d: ["--config", str(t / "nope.yaml"), "--fold", "0"],
        ("config file not found", "nope.yaml"),
    ),
    "train: YAML syntax error": Case(
        "train", yaml_file("data: [1, 2\n", "--fold", "0"), ("bad.yaml",)
    ),
    "train: unknown key": Case(
        "train", with_sets("train.lrr=1"), ("unknown config key 'train.lrr'", "lr")
    ),
    "train: override without =": Case(
        "train", with_sets("train.lr"), ("override must look like key.path=value",)
    ),
    "train: wrong type": Case(
        "train",
        with_sets("train.epochs=many"),
        ("'train.epochs' must be an integer >= 1; got 'many'",),
    ),
    "train: batch_size 0": Case(
        "train", with_sets("train.batch_size=0"), ("'train.batch_size' must be an integer >= 1",)
    ),
    "train: one fold": Case(
        "train", with_sets("folds.n_splits=1"), ("'folds.n_splits' must be an integer >= 2",)
    ),
    "train: unknown loss": Case(
        "train", with_sets("train.loss=hinge"), ("'train.loss' must be one of", "hinge")
    ),
    "train: a section given as a scalar": Case(
        "train",
        yaml_file("data: 5\n", "--set", "data.x=1", "--fold", "0"),
        ("'data' must be a mapping", "'data.x' cannot be set"),
    ),
    "train: a size that is not [H, W]": Case(
        "train", with_sets("data.image_size=[32]"), ("'data.image_size' must be [H, W]",)
    ),
    "train: fold outside the split": Case(
        "train", with_sets(fold="9"), ("fold must be in [0, 1]; got 9",)
    ),
    # The data set: CSV, RLE, images.
    "train: CSV missing": Case(
        "train",
        with_sets(data={"train_csv": "/nonexistent/train.csv"}),
        ("data.train_csv", "/nonexistent/train.csv", "does not exist"),
    ),
    "train: image folder missing": Case(
        "train",
        with_sets(data={"train_images": "/nonexistent/images"}),
        ("/nonexistent/images", "does not exist"),
    ),
    "train: header-only CSV": Case(
        "train", header_only, ("train.csv", "gives no mask for any of the 18 images")
    ),
    "train: a row whose image is missing": Case(
        "train", row_without_image, ("train.csv", "row(s) 74", "not in the image folder")
    ),
    "train: malformed RLE": Case(
        "train", set_rle("5 1 2 1"), ("train.csv", "row 3", "EncodedPixels")
    ),
    "train: non-numeric RLE": Case(
        "train", set_rle("1 x"), ("train.csv", "row 3", "EncodedPixels")
    ),
    "train: RLE past the end of its image": Case(
        "train",
        set_rle("1 99999"),
        ("train.csv", "does not fit the image file", "class 'Flower'", "runs past the end"),
        allow=("cache", "folds.csv"),
    ),
    "train: image smaller than its RLE": Case(
        "train",
        image_smaller_than_its_rle,
        ("does not fit the image file", "(8x8)"),
        allow=("cache", "folds.csv"),
    ),
    "train: unknown columns": Case(
        "train",
        csv_change(lambda f: f.rename(columns={"Image_Label": "Name"})),
        ("match no known CSV format",),
    ),
    "train: duplicate rows": Case(
        "train",
        csv_change(lambda f: pd.concat([f, f.iloc[:1]], ignore_index=True)),
        ("rows 2 and 74 both give image",),
    ),
    "train: a class not in data.classes": Case(
        "train",
        with_sets("data.classes=[Fish, Flower, Gravel]"),
        ("class 'Sugar' is not one of classes",),
    ),
    "train: an image id that leaves its folder": Case(
        "train",
        csv_change(
            lambda f: f.assign(Image_Label=f["Image_Label"].str.replace("^", "../", regex=True))
        ),
        ("not in the image folder",),
    ),
    "train: damaged state.json": Case("train", damaged_state, ("state.json is damaged", "--force")),
    # The classifier.
    "train_classifier: fold outside the split": Case(
        "train_classifier", with_sets(fold="5"), ("fold must be in [0, 1]; got 5",)
    ),
    "train_classifier: batch_size 0": Case(
        "train_classifier",
        with_sets("classifier.batch_size=0"),
        ("'classifier.batch_size' must be an integer >= 1",),
    ),
    # Tuning.
    "tune: no trained fold": Case(
        "tune", with_sets(fold=None), ("fold 0 is not finished", "foldseg train")
    ),
    "tune: config differs from the trained one": Case(
        "tune",
        trained_then(lambda run: ["--set", "data.image_size=[64, 64]"]),
        ("differs from the one the folds", "data.image_size", "--force"),
    ),
    "tune: unknown key": Case("tune", with_sets("tune.x=1", fold=None), ("unknown config key",)),
    # Prediction.
    "predict: not tuned": Case(
        "predict", trained_then(lambda run: []), ("postprocess.json not found", "foldseg tune")
    ),
    "predict: damaged postprocess.json": Case(
        "predict", trained_then(damaged_postprocess), ("postprocess.json", "not valid JSON")
    ),
    "predict: damaged metrics.json": Case(
        "predict", trained_then(damaged_metrics), ("metrics.json is damaged", "--force")
    ),
    "predict: damaged weights": Case(
        "predict",
        trained_then(truncated_weights),
        ("best_weights.h5 is damaged", "retrain its fold with --force"),
    ),
    "predict: sample lists an image the test folder lacks": Case(
        "predict",
        sample_lists_a_missing_image,
        ("sample_submission.csv", "lists 1 image(s) that the test folder", "lacks"),
    ),
    "predict: test folder missing": Case(
        "predict",
        lambda t, d: [
            "--config",
            fake_trained_run(t, d),
            "--no-postprocess",
            "--set",
            "data.test_images=/nonexistent/test",
        ],
        ("/nonexistent/test", "does not exist"),
    ),
    "predict: a fold not trained": Case(
        "predict",
        lambda t, d: ["--config", fake_trained_run(t, d, folds=(0,)), "--no-postprocess"],
        ("fold_1", "train it"),
    ),
    "predict: --with-classifier without a trained classifier": Case(
        "predict",
        lambda t, d: ["--config", fake_trained_run(t, d), "--no-postprocess", "--with-classifier"],
        ("classifier", "fold 0", "foldseg train-classifier"),
    ),
    # The report.
    "evaluate: no trained fold": Case(
        "evaluate", with_sets(fold=None), ("fold 0", "foldseg train")
    ),
    "evaluate: config differs from the trained one": Case(
        "evaluate",
        trained_then(lambda run: ["--set", "model.backbone=resnet34"]),
        ("model.backbone", "--force"),
    ),
    # The LR range test and the grid.
    "lr_find: fold outside the split": Case(
        "lr_find",
        lambda t, d: ["--config", tiny(t, d), "--fold", "4"],
        ("fold must be in [0, 1]; got 4",),
    ),
    "grid: malformed grid": Case("grid", grid_args("--grid", "train.lr"), ("--grid",)),
    "grid: unknown key in the grid": Case(
        "grid", grid_args("--grid", "train.lrr=[0.1]"), ("unknown config key 'train.lrr'",)
    ),
    # Submission files.
    "submission check: file missing": Case(
        "submission",
        lambda t, d: [
            "check",
            str(t / "absent.csv"),
            "--sample",
            str(d / "sample_submission.csv"),
            "--shape",
            "40x60",
        ],
        ("absent.csv",),
    ),
    "submission check: sample missing": Case(
        "submission",
        lambda t, d: [
            "check",
            str(d / "test_truth.csv"),
            "--sample",
            str(t / "no_sample.csv"),
            "--shape",
            "40x60",
        ],
        ("no_sample.csv", "does not exist"),
    ),
    "submission score: bad --shape": Case(
        "submission",
        lambda t, d: [
            "score",
            str(d / "test_truth.csv"),
            "--truth",
            str(d / "test_truth.csv"),
            "--shape",
            "40by60",
        ],
        ("40by60",),
    ),
    # The demo data.
    "make_demo_data: --out is a file": Case(
        "make_demo_data",
        lambda t, d: (t / "file").write_text("x") and ["--out", str(t / "file")],
        ("is a file; expected a folder",),
    ),
    "make_demo_data: --out under a file": Case(
        "make_demo_data",
        lambda t, d: (t / "file").write_text("x") and ["--out", str(t / "file" / "sub")],
        ("cannot be made", "is not a folder"),
    ),
    "make_demo_data: no training images": Case(
        "make_demo_data",
        lambda t, d: ["--out", str(t / "demo"), "--n-train", "0"],
        ("n_train",),
    ),
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    name, tmp_path, tiny_data, capsys, monkeypatch
):
    case = CASES[name]
    setup_logging()  # log to this test's captured stderr, as main will
    monkeypatch.chdir(tmp_path)
    argv = case.prepare(tmp_path, tiny_data)
    before = snapshot(tmp_path)
    main = importlib.import_module(f"pipeline.{case.cli}").main
    try:
        code = main(argv)  # an exception escaping here is a traceback for the user
    except SystemExit as exc:  # argparse's own usage errors: exit 2 and a message
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, f"{name}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err
    errors = [
        line
        for line in err.splitlines()
        if " ERROR " in line or ": error: " in line or line.startswith("error: ")
    ]
    assert errors, f"{name}: no error line in\n{err[-2000:]}"
    message = err[err.index(errors[0]) :]
    for words in case.words:
        assert words in message, f"{name}: {words!r} not in\n{message[-2000:]}"
    after = snapshot(tmp_path)
    changed = {
        path
        for path in set(before) | set(after)
        if before.get(path) != after.get(path)
        and not any(part in Path(path).parts for part in case.allow)
    }
    assert not changed, f"{name} changed files: {sorted(changed)}"


def test_the_matrix_covers_every_cli():
    clis = {case.cli for case in CASES.values()}
    assert len(CASES) >= 40
    assert clis >= {
        "train", "train_classifier", "tune", "predict", "evaluate", "lr_find", "grid",
        "submission", "make_demo_data",
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["pipeline.train", "--set", "train.batch_size=0", "--fold", "0"],
        ["pipeline.predict", "--set", "data: 5"],
        ["pipeline.make_demo_data", "--out", "/proc/version"],
    ],
)
def test_real_processes_exit_2_without_traceback(argv):
    out = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and " ERROR " in out.stderr


def test_a_yaml_section_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": 3}))
    from pipeline.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(path)

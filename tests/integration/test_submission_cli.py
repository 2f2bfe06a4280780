"""The real ``python -m pipeline.submission`` CLI on a tiny generated demo set."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("Fish", "Flower", "Gravel", "Sugar")


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    done = run_module(
        "pipeline.make_demo_data",
        "--out", str(out),
        "--n-train", "6",
        "--n-test", "4",
        "--height", "48",
        "--width", "72",
        "--truth-size", "24x36",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_check_accepts_the_truth_as_a_submission(demo: Path) -> None:
    done = run_module(
        "pipeline.submission", "check", str(demo / "test_truth.csv"),
        "--sample", str(demo / "sample_submission.csv"), "--shape", "24x36",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "16 rows, 4 images" in done.stdout
    rates = [line for line in done.stdout.splitlines() if line.startswith("positive rate")]
    assert [line.split()[2].rstrip(":") for line in rates] == list(CLASSES)
    assert all(0.0 <= float(line.split()[-1]) <= 1.0 for line in rates)


def test_score_of_the_truth_against_itself_is_one(demo: Path) -> None:
    truth = str(demo / "test_truth.csv")
    done = run_module("pipeline.submission", "score", truth, "--truth", truth, "--shape", "24x36")
    assert done.returncode == 0, done.stderr
    overall = [line for line in done.stdout.splitlines() if "overall" in line]
    assert len(overall) == 1
    assert float(overall[0].split()[3]) == 1.0


def test_corrupted_copy_fails_with_its_row(demo: Path, tmp_path: Path) -> None:
    lines = (demo / "test_truth.csv").read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ",12 x"  # spreadsheet row 6
    corrupted = tmp_path / "corrupted.csv"
    corrupted.write_text("\n".join(lines) + "\n")
    done = run_module(
        "pipeline.submission", "check", str(corrupted),
        "--sample", str(demo / "sample_submission.csv"), "--shape", "24x36",
    )  # fmt: skip
    assert done.returncode == 1
    assert "row 6, column EncodedPixels" in done.stderr
    assert "token 1 is 'x'" in done.stderr
    scored = run_module(
        "pipeline.submission", "score", str(corrupted),
        "--truth", str(demo / "test_truth.csv"), "--shape", "24x36",
    )  # fmt: skip
    assert scored.returncode == 1
    assert "row 6, column EncodedPixels" in scored.stderr


def test_images_folder_gives_the_bounds(demo: Path) -> None:
    # The truth is at 24x36 but the images are 48x72, so these bounds are looser; a
    # too-small fixed shape must fail instead.
    common = ["--sample", str(demo / "sample_submission.csv")]
    truth = str(demo / "test_truth.csv")
    done = run_module(
        "pipeline.submission", "check", truth, *common, "--images", str(demo / "test_images")
    )
    assert done.returncode == 0, done.stderr
    small = run_module("pipeline.submission", "check", truth, *common, "--shape", "2x2")
    assert small.returncode == 1
    assert "past the end of image" in small.stderr


def test_shape_or_images_is_required(demo: Path) -> None:
    done = run_module(
        "pipeline.submission", "check", str(demo / "test_truth.csv"),
        "--sample", str(demo / "sample_submission.csv"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--shape HxW" in done.stderr and "bounds" in done.stderr

"""The README is short, its links resolve and every command it shows runs as shown.

The commands run in a scratch folder laid out like the repository (``configs/``,
``data/``) with the same ``foldseg`` program; each command that takes a config gets
overrides that shrink the run (tiny sizes, one epoch, no pretrained download), as a
test fixture shrinks a real config. ``make`` targets are checked for the command they
run; the grid's experiments are listed (``--dry-run``) rather than trained: the grid's
own tests train and tune them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.layout import FOLD_METRICS
from tests.conftest import REPO

README = REPO / "README.md"
FOLDSEG = str(Path(sys.executable).parent / "foldseg")
# Appended to every command that takes a config: a run of seconds, nothing downloaded.
SHRINK = (
    "model.encoder_weights=null",
    "model.backbone=resnet18",
    "classifier.weights=null",
    "classifier.backbone=resnet18",
    "data.image_size=[32,64]",
    "data.max_images=24",
    "train.crop_size=[32,32]",
    "classifier.image_size=[32,64]",
    "folds.n_splits=2",
    "train.epochs=1",
    "classifier.epochs=1",
    "train.batch_size=8",
    "train.accumulation_steps=1",
    "train.parallel_folds=1",
    "train.verbose=0",
    "tta.views=[identity,hflip]",
)


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of ``language`` (indented ones included)."""
    blocks = []
    for match in re.finditer(rf"^( *)```{language}\n(.*?)^\1```", README.read_text(), re.S | re.M):
        indent = len(match.group(1))
        blocks.append("\n".join(line[indent:] for line in match.group(2).splitlines()))
    return blocks


def commands() -> list[str]:
    """Every command line of the README's bash blocks (comments dropped)."""
    out = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def run(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a README line in ``cwd`` with this environment's foldseg, shrunk."""
    line = line.replace(".venv/bin/foldseg", shlex.quote(FOLDSEG))
    if "--config" in line:
        line += "".join(f" --set {shlex.quote(item)}" for item in SHRINK)
    if " grid " in line:
        line += " --dry-run"
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=1200
    )


def scratch_repository(tmp_path: Path) -> Path:
    """A folder laid out like the repository: its configs, nothing trained."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def test_the_readme_is_short_and_its_links_resolve() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to missing {target}"


def test_make_runs_what_the_readme_says() -> None:
    assert {"make demo", "make test"} <= set(commands())
    dry = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert ".venv/bin/foldseg run --config configs/demo.yaml" in dry.stdout
    assert "make test" in (REPO / ".ci/run").read_text()


@pytest.mark.slow
def test_your_own_data_in_five_steps_runs_as_shown(tmp_path: Path, tiny_data: Path) -> None:
    root = scratch_repository(tmp_path)
    data = root / "data" / "mine"
    data.mkdir(parents=True)
    for name in ("train.csv", "sample_submission.csv", "train_images", "test_images"):
        source = tiny_data / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, data / name)
    (yaml_block,) = [block for block in code_blocks("yaml") if "experiment: mine" in block]
    (root / "configs" / "mine.yaml").write_text(yaml_block)
    lines = [line for line in commands() if "configs/mine.yaml" in line]
    lines.insert(0, ".venv/bin/foldseg run --config configs/mine.yaml")  # step 3, inline
    assert len(lines) >= 3
    for line in lines:
        done = run(line, root)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    run_dir = root / "runs" / "mine"
    assert (run_dir / "report" / "report.html").is_file()
    assert len(list((root / "submissions").glob("mine_2*.csv"))) == 1
    # Step 3 again, after everything is done: nothing is retrained or rewritten.
    metrics = sorted(run_dir.glob(f"**/fold_*/{FOLD_METRICS}"))
    assert len(metrics) == 4  # two segmentation and two classifier folds
    stamps = [path.stat().st_mtime_ns for path in metrics]
    again = run(lines[0], root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [path.stat().st_mtime_ns for path in metrics] == stamps
    assert "reusing" in again.stderr and "segmentation OOF Kaggle Dice" in again.stdout
    assert len(list((root / "submissions").glob("mine_2*.csv"))) == 1


@pytest.mark.slow
def test_the_stages_one_at_a_time_run_as_shown(tmp_path: Path) -> None:
    root = scratch_repository(tmp_path)
    lines = [
        line
        for line in commands()
        if "configs/demo.yaml" in line or "demo-data" in line or "submissions/demo_" in line
    ]
    assert any("demo-data" in line for line in lines) and len(lines) >= 6
    for line in lines:
        done = run(line, root)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    assert "kaggle dice overall" in done.stdout

"""The benchmarks that need nothing but the repository run in their quick mode, as a new
user runs them (``python benchmarks/X.py --quick``), and record nothing.

Each prints one JSON object that names the machine on its last line; ``--no-record``
leaves ``benchmarks/results.jsonl`` and ``docs/results.md`` as they were. Where a quick
mode takes an explicit option, a small model is chosen so that the whole file stays
within a few minutes on 2 cores. Not run here: those that train several experiments
(bench_options, bench_pseudo, bench_quality, bench_jobs), need DSB 2018 (bench_real) or
a trained run (bench_precision, bench_tta_views, quality_factors), and
bench_keras3_backends, which builds its model without the pipeline's code; see
docs/performance.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RECORDS = (REPO / "benchmarks" / "results.jsonl", REPO / "docs" / "results.md")

# (script, extra arguments; "{tmp}" is the test's own work folder)
QUICK_RUNS = [
    ("bench_rle.py", []),
    ("bench_tune.py", ["--workdir", "{tmp}"]),
    ("bench_input.py", ["--backbone", "resnet18", "--work", "{tmp}"]),
    (
        "bench_train_step.py",
        ["--backbone", "resnet18", "--size", "64", "64", "--repeats", "1", "--rounds", "1"],
    ),
    ("bench_predict.py", ["--precision", "float32", "--workdir", "{tmp}"]),
]


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize(("script", "extra"), QUICK_RUNS, ids=[s for s, _ in QUICK_RUNS])
def test_benchmark_quick_mode_runs_and_records_nothing(
    script: str, extra: list[str], tmp_path: Path
) -> None:
    before = [_bytes(path) for path in RECORDS]
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    command = [sys.executable, f"benchmarks/{script}", "--quick", "--no-record", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (
        f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["machine"]["cores"] and result["machine"]["cpu"]
    assert result["benchmark"]
    assert [_bytes(path) for path in RECORDS] == before, f"{script} --no-record recorded"

"""Shared by the benchmark scripts: machine description and the results file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.results_page import write_results_page

RESULTS = Path(__file__).resolve().parent / "results.jsonl"
RESULTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "results.md"
# /proc/cpuinfo flags named in benchmark records: SIMD width, FMA, native 16-bit math.
VECTOR_FLAGS = frozenset(
    {
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    }
)


def describe_machine() -> dict[str, object]:
    """Cores, CPU model and GPU (from nvidia-smi, if any) of this machine."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        gpu = ", ".join(names) or None
    return {"cores": os.cpu_count(), "cpu": cpu, "cpu_features": cpu_features(), "gpu": gpu}


def cpu_features() -> list[str]:
    """The CPU's vector and matrix features that decide its arithmetic speed."""
    from pipeline.core.precision import cpu_flags

    return sorted(cpu_flags() & VECTOR_FLAGS)


def compute_figures(
    model: Any,
    height: int,
    width: int,
    precision: str,
    forward_s_per_image: float | None,
    train_step_s_per_image: float | None = None,
) -> dict[str, Any]:
    """The network's FLOPs and achieved GFLOP/s next to a matmul peak measured now.

    ``precision`` is the one the timings ran in; the peak is measured in its compute
    dtype (float32, bfloat16 or float16). Times are seconds per image (None: not
    measured); a train step counts as ``compute.TRAIN_STEP_FORWARDS`` forwards.
    """
    from pipeline.nn.compute import (
        TRAIN_STEP_FORWARDS,
        achieved_gflops,
        forward_flops,
        matmul_peak,
    )

    flops = forward_flops(model, height, width)
    peak = matmul_peak(precision)
    figures: dict[str, Any] = {
        "precision": precision,
        "cpu_features": cpu_features(),
        "forward_gflop_per_image": round(flops / 1e9, 3),
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_dtype": precision,
    }
    if forward_s_per_image is not None:
        forward = achieved_gflops(flops, forward_s_per_image)
        figures["forward_gflops"] = round(forward, 1)
        figures["forward_share_of_peak"] = round(forward / peak, 3)
    if train_step_s_per_image is not None:
        train = achieved_gflops(TRAIN_STEP_FORWARDS * flops, train_step_s_per_image)
        figures["train_step_gflops"] = round(train, 1)
        figures["train_step_share_of_peak"] = round(train / peak, 3)
    return figures


def record(result: dict[str, Any], keep: bool = True) -> None:
    """Print ``result`` as the last line; if ``keep``, append it to results.jsonl and
    regenerate docs/results.md from that file (``benchmarks/results_page.py``).

    A benchmark that ran the Keras layer says which (``framework``: tf_keras | keras3);
    every record says when (``date``, UTC) and on which commit (``commit``), if known.
    """
    if "pipeline.nn.keras_backend" in sys.modules and "framework" not in result:
        result = {**result, "framework": sys.modules["pipeline.nn.keras_backend"].FRAMEWORK}
    if "date" not in result:
        result = {
            **result,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
    if "commit" not in result:
        result = {**result, "commit": current_commit()}
    if keep:
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        write_results_page(RESULTS, RESULTS_PAGE)
    print(json.dumps(result))


def current_commit() -> str | None:
    """The repository's commit (short hash, ``+dirty`` with uncommitted changes), or None."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=10", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def ensure_demo_data(config: Path) -> None:
    """Write the demo data set when ``config`` is ``configs/demo.yaml`` and it is missing.

    The benchmarks that train on the demo's config run the stages from the repository
    root, so the data goes where ``foldseg run`` (``make demo``) puts it: ``data/demo/``.

    Raises:
        ValueError: the demo data could not be written (the reason was logged).
    """
    repo = Path(__file__).resolve().parents[1]
    if config.resolve() != (repo / "configs" / "demo.yaml").resolve():
        return
    from pipeline.core.config import load_config
    from pipeline.make_demo_data import main as make_demo

    data = load_config(config).data
    if data.train_csv is None:
        return
    train_csv = Path(data.train_csv)
    out = (train_csv if train_csv.is_absolute() else repo / train_csv).parent
    if (out / train_csv.name).is_file():
        return
    size = (
        []
        if data.submission_size is None
        else ["--truth-size", "x".join(map(str, data.submission_size))]
    )
    if make_demo(["--out", str(out), *size]) != 0:
        raise ValueError(f"the demo data in {out} could not be made (see the error above)")


def format_compute(figures: dict[str, Any]) -> str:
    """One line of ``compute_figures``: achieved GFLOP/s against the peak, precision, CPU."""
    achieved = [
        f"{figures[key]:.1f} GFLOP/s {label}"
        for key, label in (("forward_gflops", "forward"), ("train_step_gflops", "train step"))
        if key in figures
    ]
    return (
        f"{', '.join(achieved)} of a {figures['matmul_peak_gflops']:.1f} GFLOP/s matmul peak "
        f"({figures['precision']}; {figures['forward_gflop_per_image']:.2f} GFLOP per image "
        f"forward); CPU features {' '.join(figures['cpu_features']) or 'none found'}"
    )

"""Shared by the benchmark scripts: machine description and the results file."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


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
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu}


def record(result: dict[str, Any], keep: bool = True) -> None:
    """Print ``result`` as the last line; append it to results.jsonl if ``keep``."""
    if keep:
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    print(json.dumps(result))

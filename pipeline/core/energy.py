"""Energy and CO2e estimate of the recorded wall times of a run (pure layer).

``estimate_energy`` turns one run's seconds and device into watts, kWh and g CO2e from
``config.energy``; ``energy_table`` does so for every timed run, with a total.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

_GPU_COUNT = re.compile(r"^\s*(\d+)\s*x\s+\S")


def estimate_energy(
    seconds: float, device: str, energy_config: Mapping[str, float]
) -> dict[str, Any]:
    """Energy and CO2e estimate of one run of ``seconds`` wall time on ``device``.

    ``device`` is as the stages record it: ``"CPU"`` or ``"<n> x <GPU name>"`` (a name
    with "GPU" in it counts as one GPU). Power is ``cpu_watts`` on CPU and
    ``gpu_watts * n`` on n GPUs; ``kwh = seconds / 3600 * watts / 1000 * pue`` and
    ``g_co2e = kwh * grid_g_co2_per_kwh``. Returns ``seconds, device, hardware, n_gpus,
    watts, kwh, g_co2e``.
    """
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be a finite number >= 0; got {seconds}")
    for key in ("cpu_watts", "gpu_watts", "pue", "grid_g_co2_per_kwh"):
        if float(energy_config[key]) < 0:
            raise ValueError(f"energy.{key} must be >= 0; got {energy_config[key]}")
    name = device.strip()
    match = _GPU_COUNT.match(name)
    if name.upper().startswith("CPU"):
        n_gpus = 0
    elif match:
        n_gpus = int(match.group(1))
    elif "GPU" in name.upper():
        n_gpus = 1
    else:
        raise ValueError(
            f"device must be 'CPU' or '<n> x <GPU name>' as the stages record it; got {device!r}"
        )
    watts = float(energy_config["gpu_watts"]) * n_gpus if n_gpus else energy_config["cpu_watts"]
    kwh = seconds / 3600.0 * float(watts) / 1000.0 * float(energy_config["pue"])
    return {
        "seconds": float(seconds),
        "device": device,
        "hardware": "gpu" if n_gpus else "cpu",
        "n_gpus": n_gpus,
        "watts": float(watts),
        "kwh": kwh,
        "g_co2e": kwh * float(energy_config["grid_g_co2_per_kwh"]),
    }


def energy_table(
    runs: Sequence[Mapping[str, Any]], energy_config: Mapping[str, float]
) -> pd.DataFrame:
    """``estimate_energy`` of each ``{run, seconds, device}`` plus a ``total`` row.

    A run whose device cannot be read stays in the table with hardware ``unknown`` and
    NaN energy, and is left out of the total (a warning names it).
    """
    rows = []
    for run in runs:
        try:
            estimate = estimate_energy(run["seconds"], run["device"], energy_config)
        except ValueError as err:
            logger.warning("%s: %s; left out of the energy total", run["run"], err)
            estimate = {"seconds": float(run["seconds"]), "device": str(run["device"])}
            estimate |= {"hardware": "unknown", "watts": np.nan, "kwh": np.nan, "g_co2e": np.nan}
        rows.append({"run": run["run"], **estimate})
    columns = ["run", "seconds", "device", "hardware", "n_gpus", "watts", "kwh", "g_co2e"]
    frame = pd.DataFrame(rows, columns=columns)
    counted = frame[frame["kwh"].notna()]
    total = {"run": "total", "seconds": counted["seconds"].sum(), "device": "", "hardware": ""}
    total |= {"n_gpus": "", "watts": "", "kwh": counted["kwh"].sum()}
    total["g_co2e"] = counted["g_co2e"].sum()
    return pd.concat([frame.astype(object), pd.DataFrame([total])], ignore_index=True)

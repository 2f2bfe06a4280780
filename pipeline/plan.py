"""Plan a config from the data: fingerprint the data set, probe the machine, time a train
step, and write a runnable config with the reason for each choice beside its key.

The fingerprint (image sizes and spread, channels, class presence, object sizes,
components per image, empty share, class overlap) is measured on the training masks,
read exactly as training reads them (``--csv`` or ``--masks``). The machine: cores,
memory, GPU, native bfloat16. Then a few train steps of the candidate model at the
candidate crop give the seconds per image and the memory per image, from which batch,
accumulation and epochs follow (``--hours``: the whole run's budget). The config is
checked against the schema before it is written; the fingerprint, the machine and the
timings are saved as JSON beside it (``<name>.fingerprint.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.atomic import write_json, write_text
from pipeline.core.commands import command_line
from pipeline.core.config import CONFIG_DIR, DEFAULT_CONFIG, Config, load_config
from pipeline.core.fingerprint import fingerprint_path, measure_fingerprint
from pipeline.core.plan_budget import fold_training_images, parallel_folds, plan_batch
from pipeline.core.planning import Choice, candidate_sizes, plan_choices, render_config
from pipeline.core.precision import BF16_CPU_FLAGS, cpu_flags
from pipeline.run.command import Command, parse_size
from pipeline.run.experiment import dataset_image_ids, read_training_masks
from pipeline.run.fold_jobs import threads_per_job
from pipeline.run.process import THREADS_ENV, enter_framework

log = logging.getLogger(__name__)


def probe_machine() -> dict[str, Any]:
    """Cores this process may use, memory (total and available, GB), the first NVIDIA GPU
    (name and memory, from ``nvidia-smi``), native bfloat16. Starts no framework, so
    that the timed step's threads can still be sized after it."""
    memory: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                memory[name] = round(int(value.split()[0]) / 2**20, 1)
    except OSError:
        pass
    gpus: list[tuple[str, float | None]] = []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        for line in out.strip().splitlines():
            name, _, total = line.rpartition(",")
            gpus.append((name.strip(), round(int(total) / 1024, 1)))
    except (OSError, ValueError, subprocess.SubprocessError):
        gpus = []
    flags = cpu_flags()
    return {
        "cores": len(os.sched_getaffinity(0)),
        "memory_total_gb": memory.get("MemTotal"),
        "memory_available_gb": memory.get("MemAvailable"),
        "gpu": gpus[0][0] if gpus else None,
        "gpus": len(gpus),
        "gpu_memory_gb": gpus[0][1] if gpus else None,
        "bf16": bool(BF16_CPU_FLAGS & flags),
        "bf16_flags": sorted(BF16_CPU_FLAGS & flags),
    }


def source_config(args: argparse.Namespace) -> Config:
    """The default config over the given data (validated: a bad path or key is exit 2)."""
    overrides = [f"data.train_images={args.images}", "data.max_images=null"]
    if args.csv is not None:
        overrides += [f"data.train_csv={args.csv}", "data.masks=null"]
    else:
        overrides += [f"data.masks={args.masks}", "data.train_csv=null"]
    overrides.append(f"data.test_images={args.test_images or args.images}")
    overrides.append(f"data.sample_submission={args.sample if args.sample else 'null'}")
    overrides.append(f"data.csv_format={args.csv_format}")
    overrides.append(f"data.mask_format={args.mask_format}")
    overrides += list(args.overrides)
    overrides.append(f"experiment={args.experiment or args.out.stem}")
    return load_config(DEFAULT_CONFIG, overrides)


def plan(args: argparse.Namespace) -> tuple[str, dict[str, Any], list[Choice]]:
    """Measure and choose; (config text, fingerprint record, choices). Writes nothing."""
    if args.out.exists() and not args.force:
        raise FileExistsError(f"--out {str(args.out)!r} exists; pass --force to replace it")
    if args.hours <= 0:
        raise ValueError(f"--hours must be > 0; got {args.hours}")
    config = source_config(args)
    enter_framework(config)
    ids = dataset_image_ids(config)
    table, _void = read_training_masks(config, ids)
    log.info("fingerprint of %d images, %d classes", len(ids), len(table.classes))
    fingerprint = measure_fingerprint(
        table.table,
        table.classes,
        config.data.train_images,
        max_images=args.sample_images,
        seed=config.seed,
        test_folder=args.test_images,
    )
    machine = probe_machine()
    sizes = candidate_sizes(fingerprint, machine)
    backbone = "efficientnetb2" if machine["gpu"] else "efficientnetb0"
    probe = config.with_overrides(
        [f"model.backbone={backbone}", "model.encoder_weights=null", "train.loss=bce_dice"]
    )
    n_train = fold_training_images(len(ids), args.folds)
    parallel = parallel_folds(machine, sizes[1].value)
    if parallel > 1:
        # Time the step as each of the parallel fold processes will run it: TensorFlow's
        # threads are sized at its start, i.e. at this import.
        os.environ.setdefault(THREADS_ENV, str(threads_per_job(parallel, machine["cores"])))
    from pipeline.nn.step_probe import time_train_step

    log.info("timing a train step at %s", sizes[1].value)
    step = time_train_step(
        probe,
        len(table.classes),
        sizes[1].value,
        batch_for=lambda bytes_per_image: plan_batch(bytes_per_image, machine, n_train),
        cores=int(os.environ.get(THREADS_ENV) or machine["cores"]),
    )
    submission = args.submission_size
    choices = plan_choices(fingerprint, machine, step, sizes, args.hours, args.folds, submission)
    out_dir = args.out.resolve().parent
    fixed: dict[str, Any] = {
        "base": _base_path(out_dir),
        "experiment": config.experiment,
    }
    data = config.data
    for key in ("train_csv", "masks", "train_images", "test_images", "sample_submission"):
        fixed[f"data.{key}"] = getattr(data, key)
    fixed["data.csv_format"] = table.csv_format
    if data.masks is not None:
        fixed["data.mask_format"] = data.mask_format
    fixed["data.classes"] = list(table.classes)
    fixed["data.submission_size"] = list(submission) if submission else None
    for item in args.overrides:
        key, _, value = item.partition("=")
        fixed[key] = yaml.safe_load(value)
    header = [
        f"Planned by `{command_line('plan')} ...` from {len(ids)} images "
        f"({', '.join(table.classes)}) on {machine['cores']} cores"
        + (f" and {machine['gpu']}" if machine["gpu"] else ""),
        f"for a budget of {args.hours:g} h. The fingerprint and timings: "
        f"{fingerprint_path(args.out).name} (shown in the report). Each comment says why.",
    ]
    text = render_config(choices, fixed, header)
    _check_loads(text, args.out)
    record = {
        "fingerprint": fingerprint,
        "machine": machine,
        "train_step": step,
        "hours": args.hours,
        "choices": [{"key": c.key, "value": c.value, "reason": c.reason} for c in choices],
    }
    return text, record, choices


def _base_path(out_dir: Path) -> str:
    """``default.yaml`` named from the config's folder: relative inside the repository's
    configs (``default.yaml``), absolute elsewhere."""
    default = (CONFIG_DIR / "default.yaml").resolve()
    relative = os.path.relpath(default, out_dir)
    return relative if not relative.startswith(os.pardir + os.sep + os.pardir) else str(default)


def _check_loads(text: str, out: Path) -> None:
    """The planned config loads against the schema from where it will live."""
    out_dir = out.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", dir=out_dir, prefix=".plan-", delete=False
    ) as handle:
        handle.write(text)
    try:
        load_config(handle.name)
    finally:
        Path(handle.name).unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="the training image folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="the training mask CSV")
    source.add_argument("--masks", help="the training mask folder")
    parser.add_argument("--test-images", help="the test image folder (default: --images)")
    parser.add_argument("--sample", help="the sample submission")
    parser.add_argument("--hours", type=float, default=1.0, help="wall-time budget (h)")
    parser.add_argument("--out", type=Path, required=True, help="the config to write")
    parser.add_argument("--experiment", help="the experiment's name (default: --out's stem)")
    parser.add_argument("--folds", type=int, default=3, help="folds (default: %(default)s)")
    parser.add_argument(
        "--submission-size",
        type=parse_size,
        help="HxW of submitted masks (default: each image's own size)",
    )
    parser.add_argument("--csv-format", default="auto", help="data.csv_format of --csv")
    parser.add_argument("--mask-format", default="auto", help="data.mask_format of --masks")
    parser.add_argument(
        "--sample-images", type=int, default=400, help="images decoded for object sizes"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a key written as given, e.g. --set data.test_truth=t.csv (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    if args.folds < 2:
        raise ValueError(f"--folds must be >= 2; got {args.folds}")
    text, record, choices = plan(args)
    for choice in choices:
        print(f"{choice.key} = {json.dumps(choice.value)}: {choice.reason}")
    write_json(fingerprint_path(args.out), record)
    write_text(args.out, text)
    print(f"wrote {args.out} and {fingerprint_path(args.out)}")
    print(f"next: {command_line('run', config=str(args.out))}")
    return 0


COMMAND = Command(
    stage="plan",
    description=__doc__,
    add_arguments=add_arguments,
    run=run,
    uses_config=False,
    examples=(
        "--images data/demo/train_images --csv data/demo/train.csv "
        "--test-images data/demo/test_images --sample data/demo/sample_submission.csv "
        "--hours 0.1 --out configs/demo_planned.yaml",
    ),
)
main = COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())

"""Pseudo-labelling rounds against round 0, paired by seed: nested CV and hidden test.

Usage: ``python benchmarks/bench_pseudo.py [--config configs/demo.yaml] [--seeds 3]
[--set KEY=VALUE ...] [--workdir DIR] [--quick] [--no-record]``

For every seed (``seed + i``: its own split and initialisation, shared by both rounds)
round 0 is trained, tuned and predicted (``python -m pipeline.train --all --resume``,
``pipeline.tune``, ``pipeline.predict``); ``python -m pipeline.pseudo_label`` keeps the
test images whose every class is confidently present or absent (``pseudo_label.*``);
round 1, a new experiment on the same split, adds them to every fold's training part
(``data.pseudo_labels``) and is trained, tuned and predicted the same way. Each round is
scored by its OOF Kaggle Dice at 0.5, the nested tuned CV (the honest figure: never on a
pseudo-labelled image, which is in no validation part) and the hidden test score when
the config has ``data.test_truth``. It prints per round the mean and spread over seeds
and the paired difference; the last line is one JSON object, also appended to
``benchmarks/results.jsonl``. ``--set`` changes every run alike (``train.epochs=6``).

The test images round 1 trains on are the ones its test score is computed on: that is
what pseudo-labelling does in a competition, and why the nested CV is the figure to
trust; the hidden test score shows what it did to the submission.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_options import summarise  # noqa: E402
from benchmarks.common import describe_machine, ensure_demo_data, record  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.layout import POSTPROCESS, PREDICT, PSEUDO_LABELS, PSEUDO_LABELS_JSON  # noqa: E402


def run(module: str, config: Path, sets: list[str], log: Path, *extra: str) -> None:
    args = [arg for item in sets for arg in ("--set", item)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with log.open("a") as out:
        subprocess.run(
            [sys.executable, "-m", module, "--config", str(config), *args, *extra],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, check=True,
        )  # fmt: skip


def run_round(config: Path, sets: list[str], workdir: Path, experiment: str) -> dict[str, Any]:
    """Train (resumable), tune and predict one experiment; its scores."""
    sets = [*sets, f"runs_dir={workdir}", f"experiment={experiment}"]
    log = workdir / f"{experiment}.log"
    run("pipeline.train", config, sets, log, "--all", "--resume")
    run("pipeline.tune", config, sets, log)
    run("pipeline.predict", config, sets, log, "--submissions-dir", str(workdir / "subs"))
    run_dir = load_config(config, sets).run_dir
    scores = json.loads((run_dir / POSTPROCESS).read_text())["extra"]["scores"]
    test = json.loads((run_dir / PREDICT).read_text()).get("test_score")
    return {
        "plain": scores["plain"],
        "nested": scores["tuned_nested"],
        "tuned": scores["tuned"],
        "test": None if test is None else float(test),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/foldseg_bench_pseudo"))
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 1 epoch, 40 images, every test image kept"
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    base = list(args.set)
    if args.quick:
        args.seeds = 1
        base += ["train.epochs=1", "data.max_images=40"]
        base += ["pseudo_label.positive=0", "pseudo_label.negative=1"]  # keep every image
    ensure_demo_data(args.config)
    seed0 = int(load_config(args.config, base).seed)
    stem = load_config(args.config).experiment
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rounds: dict[str, list[dict[str, Any]]] = {"round 0": [], "round 1": []}
    kept: list[int] = []
    for i in range(args.seeds):
        seed = seed0 + i
        sets = [*base, f"seed={seed}"]
        first = f"{stem}_pl0_s{seed}"
        rounds["round 0"].append(run_round(args.config, sets, args.workdir, first))
        labelled = [*sets, f"runs_dir={args.workdir}", f"experiment={first}"]
        try:
            run("pipeline.pseudo_label", args.config, labelled, args.workdir / f"{first}.log")
        except subprocess.CalledProcessError as exc:
            if exc.returncode != 2:
                raise
            # No test image was confident enough (exit 2, nothing written): round 1 would
            # be round 0 again.
            kept.append(0)
            rounds["round 1"].append(dict(rounds["round 0"][-1]))
        else:
            first_dir = load_config(args.config, labelled).run_dir
            summary = json.loads((first_dir / PSEUDO_LABELS_JSON).read_text())
            kept.append(int(summary["kept_images"]))
            table = first_dir / PSEUDO_LABELS
            second = [*sets, f"data.pseudo_labels={table}"]
            rounds["round 1"].append(
                run_round(args.config, second, args.workdir, f"{stem}_pl1_s{seed}")
            )
        print(f"seed {seed}: {kept[-1]} test images pseudo-labelled; " + ", ".join(
            f"{name} {r[-1]['plain']:.4f}/{r[-1]['nested']:.4f}/{r[-1]['test'] or 0:.4f}"
            for name, r in rounds.items()
        ), flush=True)  # fmt: skip
    table_out: dict[str, Any] = {}
    print("round     OOF at 0.5          nested tuned        hidden test")
    for name, runs in rounds.items():
        row = {key: summarise([r[key] for r in runs]) for key in ("plain", "nested")}
        tests = [r["test"] for r in runs if r["test"] is not None]
        if tests:
            row["test"] = summarise(tests)
        print(f"{name:<9} " + "   ".join(
            f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in ("plain", "nested", "test")
            if k in row
        ))  # fmt: skip
        table_out[name] = row
    diffs: dict[str, Any] = {}
    for key in ("plain", "nested", "test"):
        pairs = [(a[key], b[key]) for a, b in zip(rounds["round 0"], rounds["round 1"],
                                                   strict=True) if a[key] is not None]  # fmt: skip
        if pairs:
            diff = np.subtract([b for _, b in pairs], [a for a, _ in pairs])
            diffs[key] = {**summarise(diff.tolist()), "wins": int((diff > 0).sum())}
            wins = f"{int((diff > 0).sum())}/{len(diff)}"
            print(f"paired {key} difference (round 1 - round 0): {diff.mean():+.4f} ± "
                  f"{diff.std():.4f} ({wins} seeds better)")  # fmt: skip
    result = {
        "benchmark": "pseudo_labels",
        "machine": describe_machine(),
        "config": str(args.config),
        "overrides": base,
        "seeds": args.seeds,
        "kept_test_images": kept,
        "rounds": table_out,
        "paired_diff": diffs,
        "total_s": round(time.perf_counter() - started, 1),
    }
    record(result, keep=not (args.no_record or args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())

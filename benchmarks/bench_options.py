"""Training and post-processing options against their baseline, paired by seed, nested CV.

Usage: ``python benchmarks/bench_options.py [--config configs/demo.yaml]
[--options ema,adamw,lovasz,encoder_lr,swa,at_least_one,head] [--seeds 3] [--set KEY=VALUE ...]
[--workdir DIR] [--quick] [--no-record]``

For every seed (``seed + i``: its own split and initialisation, shared by every option
of that seed) the baseline and each option are trained (``python -m pipeline.train
--all --resume``, so a rerun trains only what is missing) and tuned (``python -m
pipeline.tune``). Each is scored by its OOF Kaggle Dice at 0.5 (the raw network) and
by the nested tuned CV (each fold scored with the post-processing chosen on the other
folds: the honest figure). It prints per option the mean and spread over seeds and the
paired difference from the baseline (mean, spread, and how many seeds it won); the last
line is one JSON object, also appended to ``benchmarks/results.jsonl``. ``--set`` changes
every run alike (e.g. ``train.epochs=6`` for a shorter budget).
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

from benchmarks.common import describe_machine, ensure_demo_data, record  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.layout import POSTPROCESS  # noqa: E402

# Each option is a set of overrides of the baseline.
OPTIONS: dict[str, list[str]] = {
    "ema": ["train.ema_decay=0.99"],
    "adamw": ["train.weight_decay=0.01"],
    "lovasz": ["train.loss=lovasz"],
    "encoder_lr": ["train.encoder_lr_factor=0.1"],
    "swa": ["train.swa_top=3"],
    "at_least_one": ["postprocess.at_least_one=always"],
    "min_components": ["postprocess.min_components=[0,30,100,300]"],
    "fused_gate": ["postprocess.gates=[none,classifier,segmentation,fused]"],
    # The auxiliary head's loss, and its presence as the classifier gates' (the baseline
    # trains no separate classifier, so its tuning has no classifier gate).
    "head": ["model.classification_head=true"],
}
# Options that change only the tuning reuse another run's trained folds, and are compared
# with that run's own tuning: the baseline's, or the head's for the fused gate (the
# baseline has no presence probability, so its tuning would drop the fused gate).
TUNE_ONLY: dict[str, str] = {
    "min_components": "baseline",
    "at_least_one": "baseline",
    "fused_gate": "head",
}


def run_option(
    config: Path, overrides: list[str], experiment: str, workdir: Path, train: bool
) -> dict[str, float]:
    """Train (unless ``train`` is False) and tune one experiment; its two scores."""
    sets = [*overrides, f"runs_dir={workdir}", f"experiment={experiment}"]
    args = [arg for item in sets for arg in ("--set", item)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = workdir / f"{experiment}.log"
    with log.open("a") as out:
        if train:
            subprocess.run(
                [sys.executable, "-m", "pipeline.train", "--config", str(config), "--all",
                 "--resume", *args],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, check=True,
            )  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "pipeline.tune", "--config", str(config), *args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, check=True,
        )  # fmt: skip
    scores = json.loads((workdir / experiment / POSTPROCESS).read_text())["extra"]["scores"]
    return {"plain": scores["plain"], "nested": scores["tuned_nested"], "tuned": scores["tuned"]}


def summarise(values: list[float]) -> dict[str, Any]:
    return {
        "mean": round(float(np.mean(values)), 4),
        "std": round(float(np.std(values)), 4),
        "seeds": [round(v, 4) for v in values],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--options", default="ema,adamw,lovasz")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/foldseg_bench_options"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 40 images")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    options = [o for o in args.options.split(",") if o]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        parser.error(f"unknown option {unknown[0]!r}; choose from {', '.join(OPTIONS)}")
    for option in options:
        source = TUNE_ONLY.get(option, "baseline")
        if source != "baseline" and source not in options[: options.index(option)]:
            parser.error(f"option {option!r} is tuned on the folds of {source!r}: list it first")
    base = list(args.set)
    if args.quick:
        args.seeds = 1
        base += ["train.epochs=1", "data.max_images=40", "classifier.epochs=1"]
    ensure_demo_data(args.config)
    seed0 = int(load_config(args.config, base).seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stem = load_config(args.config).experiment
    started = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {"baseline": [], **{o: [] for o in options}}
    for i in range(args.seeds):
        seed = seed0 + i
        names = {"baseline": f"{stem}_base_s{seed}"}
        results["baseline"].append(
            run_option(args.config, [*base, f"seed={seed}"], names["baseline"], args.workdir, True)
        )
        for option in options:
            overrides = [*base, f"seed={seed}", *OPTIONS[option]]
            if option in TUNE_ONLY:
                # Tuned on another run's folds, with that run's overrides too; its
                # postprocess.json is put back afterwards (tune writes into the run).
                reference = TUNE_ONLY[option]
                experiment = names[reference]
                if reference != "baseline":
                    overrides = [*base, f"seed={seed}", *OPTIONS[reference], *OPTIONS[option]]
                source = args.workdir / experiment / POSTPROCESS
                kept = source.read_bytes()
                scores = run_option(args.config, overrides, experiment, args.workdir, False)
                source.write_bytes(kept)
            else:
                names[option] = f"{stem}_{option}_s{seed}"
                scores = run_option(args.config, overrides, names[option], args.workdir, True)
            results[option].append(scores)
        print(f"seed {seed}: " + ", ".join(
            f"{name} {r[-1]['plain']:.4f}/{r[-1]['nested']:.4f}" for name, r in results.items()
        ), flush=True)  # fmt: skip
    table: dict[str, Any] = {}
    print("option           OOF at 0.5 (mean ± std)   nested tuned (mean ± std)   "
          "paired nested diff vs baseline or the run it reuses (wins)")  # fmt: skip
    for name, runs in results.items():
        plain = [r["plain"] for r in runs]
        nested = [r["nested"] for r in runs]
        row: dict[str, Any] = {"plain": summarise(plain), "nested": summarise(nested)}
        line = (
            f"{name:<16} {np.mean(plain):.4f} ± {np.std(plain):.4f}         "
            f"{np.mean(nested):.4f} ± {np.std(nested):.4f}"
        )
        if name != "baseline":
            reference = TUNE_ONLY.get(name, "baseline")
            base_plain = [r["plain"] for r in results[reference]]
            base_nested = [r["nested"] for r in results[reference]]
            row["compared_with"] = reference
            diff_plain = np.subtract(plain, base_plain)
            diff = np.subtract(nested, base_nested)
            row["paired_plain_diff"] = summarise(diff_plain.tolist())
            row["paired_nested_diff"] = summarise(diff.tolist())
            row["nested_wins"] = int((diff > 0).sum())
            wins = f"{int((diff > 0).sum())}/{len(diff)}"
            line += f"        {diff.mean():+.4f} ± {diff.std():.4f} ({wins})"
            line += f" vs {reference}" if reference != "baseline" else ""
        print(line)
        table[name] = row
    result = {
        "benchmark": "options",
        "machine": describe_machine(),
        "config": str(args.config),
        "overrides": base,
        "seeds": args.seeds,
        "options": {o: OPTIONS[o] for o in options},
        "results": table,
        "total_s": round(time.perf_counter() - started, 1),
    }
    record(result, keep=not (args.no_record or args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())

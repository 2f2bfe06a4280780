"""``python -m pipeline.ensemble``: blend trained experiments, tuned and scored honestly.

The ensemble's config is an ordinary config (``base: demo.yaml``, its own
``experiment``) with an ``ensemble`` section naming the member experiments:

    ensemble:
      members:
        - configs/demo.yaml
        - {config: configs/demo.yaml, set: [experiment=demo_r18, model.backbone=resnet18]}
      weight_step: 0.25

The members must share one split (byte-identical ``folds.csv``), their classes and the
submission size (checked by ``run.ensemble_members``). One streaming pass over their
out-of-fold stores chooses, per class, the blend and its post-processing together,
nested and in-sample (``run.ensemble_choice``); each member alone is one of the blends,
so the report sets each member's own scores beside the ensemble's. The classifier
gates read the mean presence of the members that have one (a trained classifier or a
presence head), and ``postprocess.at_least_one`` is resolved and scored as tune does.

Then every member's fold-merged test probabilities are blended with the chosen
weights, post-processed (gates, the at-least-one rule) and written as a validated
submission. A member's stored test outputs (``runs/<member>/test_probs/`` and its test
presence, written by ``python -m pipeline.predict``) are reused while what they were
predicted from is unchanged; otherwise that member's predict runs first (with
``--with-classifier`` when the ensemble's gate needs its classifier).

Writes ``runs/<experiment>/{postprocess.json, ensemble.json, ensemble.md,
predict.json}``, the submission and its row in ``submissions/history.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import rle
from pipeline.core.atomic import write_text
from pipeline.core.blend import blend_levels
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.exclusive import is_exclusive
from pipeline.core.images import cache_path, read_original_sizes
from pipeline.core.layout import (
    ENSEMBLE,
    ENSEMBLE_REPORT,
    POSTPROCESS,
    PREDICT,
)
from pipeline.core.postprocess import postprocess_image, resolve_at_least_one, save_postprocess
from pipeline.core.probstore import ProbReader
from pipeline.run.at_least_one import rule_scores
from pipeline.run.command import Command, add_submission_arguments, config_from_args
from pipeline.run.ensemble_choice import EnsembleChoice, blend_grid, choose_blend
from pipeline.run.ensemble_members import Member, open_members
from pipeline.run.json_files import write_json
from pipeline.run.prediction import list_test_images, write_outputs
from pipeline.run.run_lock import hold_lock
from pipeline.run.stored_predictions import fresh_test_presence, fresh_test_probs
from pipeline.run.tracking import link_members, record_run, tracked

log = logging.getLogger(__name__)


def comparison_table(choice: EnsembleChoice, classes: Sequence[str]) -> pd.DataFrame:
    """Per class and overall: each member's and the blend's nested and in-sample scores."""
    rows = []
    for name in [*classes, "overall"]:
        row: dict[str, Any] = {"class": name}
        results = {**choice.members, "ensemble": choice.blend}
        for label, result in results.items():
            if name == "overall":
                row[f"{label} nested"] = result.nested_score
                row[f"{label} in-sample"] = result.score
            else:
                row[f"{label} nested"] = result.per_class[name].nested_score
                row[f"{label} in-sample"] = result.per_class[name].score
        row["weights"] = (
            "" if name == "overall" else " / ".join(f"{w:g}" for w in choice.weights[name])
        )
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    """The comparison as fixed-width text, scores to 4 decimals."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def member_test_outputs(
    member: Member, submissions_dir: Path, image_ids: Sequence[str], source: str | None
) -> tuple[ProbReader, np.ndarray | None]:
    """The member's stored test probs and, when ``source`` names its presence
    (``classifier`` or ``head``), its stored test presence (N, C): predicting them first
    when missing or stale."""
    classes = member.exp.classes

    def stored() -> tuple[ProbReader | None, np.ndarray | None]:
        reader = fresh_test_probs(member.config, image_ids)
        if reader is None or source is None:
            return reader, None
        return reader, fresh_test_presence(member.config, classes, image_ids, source)

    reader, presence = stored()
    if reader is not None and (source is None or presence is not None):
        log.info("member %s: reusing its test outputs in %s", member.name, reader.directory)
        return reader, presence
    log.info("member %s: predicting its test probs (%s)", member.name, command_line("predict"))
    command = [sys.executable, "-m", "pipeline.predict", "--config", str(member.config.source)]
    command += [arg for item in member.overrides for arg in ("--set", item)]
    command += ["--submissions-dir", str(submissions_dir)]
    if not (member.config.run_dir / POSTPROCESS).is_file():
        command.append("--no-postprocess")
    if source == "classifier":
        command.append("--with-classifier")
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        errors = [line.split(" ERROR ", 1)[1] for line in lines if " ERROR " in line]
        reason = errors[-1] if errors else (lines[-1] if lines else "no output")
        raise RuntimeError(f"predicting member {member.name!r} failed: {reason}")
    reader, presence = stored()
    if reader is None or (source is not None and presence is None):
        raise RuntimeError(f"member {member.name!r}: predict left no fresh test outputs")
    return reader, presence


@dataclass(frozen=True)
class _Sizes:
    """The test images' ids and original sizes (``run.prediction.ImageSizes``)."""

    image_ids: list[str]
    original_sizes: np.ndarray


def predict_ensemble(
    config: Config,
    members: Sequence[Member],
    choice: EnsembleChoice,
    out: Path | None,
    submissions_dir: Path,
) -> dict[str, Any]:
    """Blend the members' test probs per class, post-process and write the submission."""
    first = members[0]
    classes = first.exp.classes
    image_ids = list_test_images(first.config, first.exp)
    gated = choice.uses_presence()
    outputs = [
        member_test_outputs(
            m, submissions_dir, image_ids, choice.presence_members.get(m.name) if gated else None
        )
        for m in members
    ]
    readers = [reader for reader, _ in outputs]
    tables = [presence for _, presence in outputs if presence is not None]
    # The members' mean presence, as the gates were tuned on.
    presence = np.mean(tables, axis=0) if tables else None
    weights = np.array([choice.weights[name] for name in classes])
    params = [choice.blend.per_class[name].params for name in classes]
    rule = bool(choice.at_least_one.get("applied"))
    rows: list[tuple[str, str, str]] = []
    for i, image_id in enumerate(image_ids):
        q = blend_levels([np.asarray(r.get(image_id)) for r in readers], weights)
        masks = postprocess_image(q, params, None if presence is None else presence[i], rule)
        rows.extend(
            (image_id, name, text)
            for name, text in zip(classes, rle.encode_batch(masks), strict=True)
        )
    table = pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])
    test_cache = cache_path(first.exp.cache_dir, "test", first.config.data.image_size)
    sizes = read_original_sizes(test_cache)
    test_sizes = _Sizes(list(image_ids), np.array([sizes[i] for i in image_ids]))
    return write_outputs(
        config,
        first.exp,
        table,
        image_ids,
        test_sizes,
        out,
        submissions_dir,
        choice.scores()["in_sample"],
        choice.scores()["nested"],
    )


def ensemble(
    config: Config, out: Path | None = None, submissions_dir: Path = Path("submissions")
) -> dict[str, Any]:
    """Choose the blend on the members' OOF, write its report, then predict the test set."""
    started = time.perf_counter()
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; name the submission file")
    if Path(submissions_dir).exists() and not Path(submissions_dir).is_dir():
        raise ValueError(f"--submissions-dir {str(submissions_dir)!r} is not a directory")
    members = open_members(config)
    softmax = [m.name for m in members if is_exclusive(m.config.model.activation)]
    if softmax or is_exclusive(config.model.activation):
        raise ValueError(
            f"ensemble members {softmax or [config.experiment]} use model.activation: "
            "softmax; blends search per-class thresholds on independent probabilities, "
            "which argmax masks do not have: ensembles take sigmoid members only"
        )
    classes = members[0].exp.classes
    n_blends = len(blend_grid(config, len(members)))
    resolve_at_least_one(str(config.postprocess.at_least_one), False)  # a bad choice: refused
    with hold_lock(config.run_dir, f"run {config.run_dir} (ensemble)"):
        log.info(
            "ensemble of %s: scoring %d blends per class on their OOF stores",
            ", ".join(m.name for m in members),
            n_blends,
        )
        choice = choose_blend(config, members)
        table = comparison_table(choice, classes)
        # The submission first: a failed prediction leaves the run's files as they were.
        result = predict_ensemble(config, members, choice, out, submissions_dir)
        run_dir = config.run_dir
        record: dict[str, Any] = {
            "members": [
                {"experiment": m.name, "config": str(m.config.source), "set": list(m.overrides)}
                for m in members
            ],
            "weight_step": float(config.ensemble.weight_step),
            "blends_per_class": choice.n_blends,
            "weights": choice.weights,
            "scores": {
                **{
                    label: {"nested": result.nested_score, "in_sample": result.score}
                    for label, result in choice.members.items()
                },
                "ensemble": choice.scores(),
            },
            "presence": choice.presence_members,
            "at_least_one": choice.at_least_one,
            "table": table.to_dict(orient="records"),
        }
        extra: dict[str, Any] = {
            **choice.blend.to_dict(),
            "at_least_one": choice.at_least_one,
            "gate_source": "members" if choice.presence_members else None,
            "ensemble": record,
        }
        if "per_class" in choice.at_least_one:
            # The OOF figures predict and evaluate read: the rule as applied (see tune).
            extra["scores"] = {**extra["scores"], **rule_scores(choice.at_least_one)}
            for name, figures in choice.at_least_one["per_class"].items():
                extra["per_class"][name] = {**extra["per_class"][name], **figures}
        save_postprocess(run_dir / POSTPROCESS, choice.blend.params_by_class(), extra=extra)
        write_json(run_dir / ENSEMBLE, record)
        _write_report(run_dir / ENSEMBLE_REPORT, members, choice, table)
        result.update(
            {"ensemble": record["scores"], "seconds": round(time.perf_counter() - started, 3)}
        )
        write_json(run_dir / PREDICT, result)
    with tracked(config) as tracker:
        record_run(tracker, config)
        tracker.log_artifact(run_dir / ENSEMBLE)
        link_members(tracker, "ensemble", [m.config for m in members], nest=False)
    result["table"] = table
    return result


def _write_report(
    path: Path, members: Sequence[Member], choice: EnsembleChoice, table: pd.DataFrame
) -> None:
    lines = [
        f"# Ensemble of {', '.join(m.name for m in members)}",
        "",
        f"{choice.n_blends} blends per class (weights in the order of the members), each "
        "with every post-processing setting; nested = each fold scored with the blend and "
        "setting chosen on the other folds (the honest CV), in-sample = chosen and scored on "
        "the same images (optimistic). A member's columns are the same search on it alone "
        "(its classifier gates on the ensemble's presence).",
        "",
        "```",
        format_table(table),
        "```",
        "",
        _presence_line(choice),
    ]
    rule = choice.at_least_one
    if "per_class" in rule:
        lines.append(
            f"At-least-one rule ({rule['choice']}): "
            f"{'applied' if rule['applied'] else 'not applied'}; nested "
            f"{rule['nested']['without']:.4f} without, {rule['nested']['with']:.4f} with; "
            f"in-sample {rule['in_sample']['without']:.4f} without, "
            f"{rule['in_sample']['with']:.4f} with. The ensemble's figures: nested "
            f"{choice.scores()['nested']:.4f}, in-sample {choice.scores()['in_sample']:.4f}."
        )
    write_text(path, "\n".join([*lines, ""]))


def _presence_line(choice: EnsembleChoice) -> str:
    if not choice.presence_members:
        return "Classifier gates: not searched (no member has presence probabilities)."
    sources = ", ".join(f"{name}'s {source}" for name, source in choice.presence_members.items())
    won = [c for c in choice.blend.classes if choice.blend.per_class[c].params.uses_classifier]
    return (
        f"Classifier gates searched on the mean presence of {sources}; chosen for "
        f"{', '.join(won) if won else 'no class'}."
    )


def _run(args: argparse.Namespace) -> int:
    result = ensemble(config_from_args(args), args.out, args.submissions_dir)
    print(format_table(result["table"]))
    scores = result["ensemble"]["ensemble"]
    print(
        f"ensemble OOF Kaggle Dice: nested {scores['nested']:.4f} (honest: chosen on the other "
        f"folds), in-sample {scores['in_sample']:.4f}"
    )
    test = result["test_score"]
    print(f"test Kaggle Dice: {'-' if test is None else f'{test:.4f}'}")
    print(f"submission: {result['submission']}")
    return 0


COMMAND = Command(
    stage="ensemble",
    description=__doc__,
    add_arguments=add_submission_arguments,
    run=_run,
    examples=("--config configs/demo_ensemble.yaml",),
    bad_input=(RuntimeError,),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())

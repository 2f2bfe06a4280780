"""The commands a user runs, named once (pure layer).

Every stage is one subcommand of the front door (``foldseg STAGE``) and one module
(``python -m pipeline.STAGE``); both forms take the same arguments. Messages that tell a
user what to run next spell the command with ``command_line``, so a renamed stage or
front door changes here only.
"""

from __future__ import annotations

from dataclasses import dataclass

FRONT_DOOR = "foldseg"


@dataclass(frozen=True)
class Stage:
    """One subcommand: its front-door ``name``, the ``module`` that runs it and a one-line
    ``summary`` for ``foldseg --help``."""

    name: str
    module: str
    summary: str


STAGES: tuple[Stage, ...] = (
    Stage("run", "pipeline.workflow", "every stage in order for a config, skipping what is done"),
    Stage("demo-data", "pipeline.make_demo_data", "write the embedded demo data set"),
    Stage("train", "pipeline.train", "train segmentation folds (--fold K or --all)"),
    Stage(
        "train-classifier",
        "pipeline.train_classifier",
        "train the presence classifier's folds (--fold K or --all)",
    ),
    Stage("tune", "pipeline.tune", "choose the post-processing on the out-of-fold predictions"),
    Stage("predict", "pipeline.predict", "folds x TTA -> gate -> post-processing -> submission"),
    Stage("export", "pipeline.export", "the trained folds as a bundle that predicts anywhere"),
    Stage("run-bundle", "pipeline.run_bundle", "predict a folder of images with a bundle"),
    Stage("evaluate", "pipeline.evaluate", "the cross-validation report"),
    Stage("submission", "pipeline.submission", "check or score a submission file"),
    Stage("lr-find", "pipeline.lr_find", "the learning-rate range test"),
    Stage("grid", "pipeline.grid", "a seeded grid search, one experiment per setting and seed"),
    Stage("ensemble", "pipeline.ensemble", "blend trained experiments that share one split"),
    Stage("pseudo-label", "pipeline.pseudo_label", "confident test predictions as training labels"),
    Stage("convert", "pipeline.convert", "training masks from a CSV to a mask folder, or back"),
    Stage(
        "plan", "pipeline.plan", "a runnable config from a data set's fingerprint and the machine"
    ),
    Stage("track", "pipeline.track", "upload a run (or existing run directories) to MLflow"),
)

_BY_NAME = {stage.name: stage for stage in STAGES}


def find_stage(name: str) -> Stage:
    """The stage called ``name`` (``train-classifier``; ``train_classifier`` is accepted).

    Raises:
        ValueError: naming the valid stages.
    """
    stage = _BY_NAME.get(name.replace("_", "-"))
    if stage is None:
        valid = ", ".join(s.name for s in STAGES)
        raise ValueError(f"unknown command {name!r}; expected one of: {valid}")
    return stage


def command_line(stage: str, *args: str, config: str | None = None) -> str:
    """The command a message tells the user to run, e.g. ``command_line("train",
    "--fold 0", config="configs/demo.yaml")`` -> ``foldseg train --config
    configs/demo.yaml --fold 0``."""
    parts = [FRONT_DOOR, find_stage(stage).name]
    if config is not None:
        parts += ["--config", config or "<config>"]
    parts += [arg for arg in args if arg]
    return " ".join(parts)

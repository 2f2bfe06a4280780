"""Training phases: encoder warm-up freezing and progressive unfreezing (pure layer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    """From epoch ``start`` (0-based) on, the top ``fraction`` of the encoder trains.

    ``lr`` (None = keep the current one) is set when the phase begins; each phase is
    compiled with a fresh optimizer, since the set of trainable variables changes.
    """

    start: int
    fraction: float
    lr: float | None = None


def training_phases(
    epochs: int, encoder_freeze_epochs: int, unfreeze_schedule: Sequence[Mapping[str, Any]]
) -> list[Phase]:
    """The phases of a run of ``epochs`` epochs.

    ``encoder_freeze_epochs`` N > 0: the encoder is frozen for epochs [0, N), then the
    whole encoder trains. ``unfreeze_schedule`` stages ``{epoch, fraction, lr}``: the
    encoder is frozen until the first stage, then each stage unfreezes the top
    ``fraction`` of it (from the deepest layers down). Both may be combined; stages at
    or past ``epochs`` never start and are dropped.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1; got {epochs}")
    if encoder_freeze_epochs < 0:
        raise ValueError(f"model.encoder_freeze_epochs must be >= 0; got {encoder_freeze_epochs}")
    stages = [dict(s) for s in unfreeze_schedule]
    if not stages and encoder_freeze_epochs == 0:
        return [Phase(0, 1.0)]
    phases: list[Phase] = []
    if encoder_freeze_epochs > 0 and not stages:
        stages = [{"epoch": encoder_freeze_epochs, "fraction": 1.0, "lr": None}]
    elif encoder_freeze_epochs > 0 and stages[0]["epoch"] < encoder_freeze_epochs:
        raise ValueError(
            f"unfreeze stages must start after epoch {encoder_freeze_epochs} "
            f"(model.encoder_freeze_epochs); got {stages[0]['epoch']}"
        )
    elif encoder_freeze_epochs > 0 and stages[0]["epoch"] > encoder_freeze_epochs:
        stages.insert(0, {"epoch": encoder_freeze_epochs, "fraction": 1.0, "lr": None})
    if stages[0]["epoch"] == 0:
        first = stages.pop(0)
        phases.append(Phase(0, float(first["fraction"]), first.get("lr")))
    else:
        phases.append(Phase(0, 0.0))
    for stage in stages:
        if stage["epoch"] >= epochs:
            break
        if stage["epoch"] <= phases[-1].start:
            raise ValueError(
                f"unfreeze stages must start after epoch {phases[-1].start}; got {stage['epoch']}"
            )
        phases.append(Phase(int(stage["epoch"]), float(stage["fraction"]), stage.get("lr")))
    return phases

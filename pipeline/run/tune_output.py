"""What ``python -m pipeline.tune`` chose and wrote, and the table it prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.postprocess import CLASSIFIER_GATES
from pipeline.core.tune_result import TuneResult
from pipeline.run.at_least_one import rule_scores


@dataclass(frozen=True)
class TuneOutput:
    """What ``tune`` chose and wrote."""

    result: TuneResult
    n_images: int
    classifier_used: bool
    postprocess_path: Path
    table_path: Path
    grid_path: Path
    search_seconds: float  # the streaming pass alone
    at_least_one: dict[str, Any] = field(default_factory=dict)  # the rule and its scores

    def oof_scores(self) -> tuple[float, float]:
        """(in-sample, nested) tuned OOF Kaggle Dice of the post-processing predict applies
        (the at-least-one rule included where tune scored it)."""
        if "per_class" in self.at_least_one:
            scores = rule_scores(self.at_least_one)
            return float(scores["tuned"]), float(scores["tuned_nested"])
        return float(self.result.score), float(self.result.nested_score)


def format_summary(output: TuneOutput) -> str:
    """The printed table: per class and overall, plain 0.5, tuned (nested, then in-sample),
    the chosen setting and how many folds' nested choices agree with it."""
    result = output.result
    # The component size column appears only when sizes were searched.
    components = len(set(result.min_components)) > 1
    lines = [
        f"post-processing tuned on {output.n_images} out-of-fold images "
        f"({len(result.fold_counts)} folds); gates searched: {', '.join(result.gates)}"
        + ("" if CLASSIFIER_GATES & set(result.gates) else " (no classifier gate searched)"),
        "nested = each fold scored with the setting tuned on the other folds (the honest "
        "CV); in-sample = tuned and scored on the same images (optimistic)",
        f"{'class':<12} {'plain 0.5':>9} {'nested':>9} {'in-sample':>9} {'thr+area':>9} "
        f"{'folds mean ± std':>17}  {'gate':<20} {'threshold':>9} {'min_area':>8} "
        + (f"{'min_comp':>8} " if components else "")
        + f"{'agree':>6}",
    ]
    summary = result.summary()
    stability = result.stability()
    for row in summary.itertuples(index=False):
        name = str(row[0])
        spread = f"{row.fold_mean:.4f} ± {row.fold_std:.4f}"
        head = (
            f"{name:<12} {row.plain:>9.4f} {row.tuned_nested:>9.4f} {row.tuned:>9.4f} "
            f"{row.no_gate:>9.4f} {spread:>17}"
        )
        if name in result.per_class:
            params = result.per_class[name].params
            gate = (
                params.gate if params.gate == "none" else f"{params.gate}@{params.gate_threshold}"
            )
            agree = f"{stability[name]['folds_agreeing']}/{stability[name]['folds']}"
            head += f"  {gate:<20} {params.threshold:>9} {params.min_area:>8} "
            head += (f"{params.min_component:>8} " if components else "") + f"{agree:>6}"
        lines.append(head)
    lines.append(
        f"CV Kaggle Dice: nested {result.nested_score:.4f} (honest), in-sample "
        f"{result.score:.4f}, plain 0.5 {result.plain_score:.4f}"
    )
    rule = output.at_least_one
    if rule.get("choice") == "search":
        folds = ", ".join("on" if d else "off" for d in rule["fold_decisions"])
        lines.append(
            f"at least one class per image (search): nested {rule['nested']['without']:.4f} "
            f"-> {rule['nested']['searched']:.4f} (each fold decided on the others: {folds}; "
            f"always on {rule['nested']['with']:.4f}), in-sample "
            f"{rule['in_sample']['without']:.4f} -> {rule['in_sample']['with']:.4f}; "
            + ("predict applies it" if rule["applied"] else "not applied")
        )
    elif rule.get("applied"):
        lines.append(
            f"at least one class per image ({rule['choice']}): nested "
            f"{rule['nested']['without']:.4f} -> {rule['nested']['with']:.4f} "
            f"({rule['images_changed']['nested']} images), in-sample "
            f"{rule['in_sample']['without']:.4f} -> {rule['in_sample']['with']:.4f}; "
            "predict applies it"
        )
    elif rule.get("choice") == "auto":
        lines.append(
            "at least one class per image: not applied (auto: some training images have no class)"
        )
    lines.append(f"wrote {output.postprocess_path}, {output.table_path}, {output.grid_path}")
    return "\n".join(lines)

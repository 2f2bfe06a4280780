"""An ensemble's blend, post-processing, presence gate and at-least-one rule, chosen on
its members' out-of-fold stores (run layer, pure).

``choose_blend`` makes one streaming pass over the members' OOF stores and scores, per
class, every blend on the simplex grid of ``ensemble.weight_step`` (``core.blend``) with
every post-processing setting of ``postprocess`` (``core.threshold_search``): the blend
and its post-processing are chosen together, and the nested figure scores each fold
with the choice made on the other folds. Each member alone is one of the blends, so
each member's own nested and in-sample scores come from the same pass (their classifier
gates read the ensemble's presence too, so a member without a classifier is scored
with the others').

The classifier gates (``classifier``, ``fused``) read the members' presence: the mean
of the presence probabilities of every member that has one (its separate classifier's
OOF probs, else its presence head's), over the same images (``ensemble_presence``).

The at-least-one rule (``postprocess.at_least_one``) is then scored as tune scores it
(``run.at_least_one``), in a second pass where each fold's images are blended with the
weights chosen without that fold (``score_rule``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.core.blend import blend_levels, one_hot_index, simplex_weights
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.folds import classifier_skip_reason
from pipeline.core.images import cache_path, read_original_sizes
from pipeline.core.postprocess import CLASSIFIER_GATES, resolve_at_least_one, searchable_gates
from pipeline.core.probstore import ProbReader
from pipeline.core.threshold_choice import GridSums
from pipeline.core.threshold_search import GridAccumulator
from pipeline.core.truth import decode_truth
from pipeline.core.tune_result import TuneResult
from pipeline.run.at_least_one import every_image_has_a_class, rule_scores, score_at_least_one
from pipeline.run.ensemble_members import Member
from pipeline.run.oof import open_segmentation_oof, presence_source, read_classifier_probs

log = logging.getLogger(__name__)

# Blends per class one ensemble may score (each costs a pass of the grid search).
MAX_BLENDS = 300


@dataclass(frozen=True)
class EnsembleChoice:
    """The tuning outcome: the blend and its post-processing per class, and the scores."""

    weights: dict[str, list[float]]  # class -> one weight per member
    blend: TuneResult  # chosen over every blend (nested: chosen on the other folds)
    members: dict[str, TuneResult]  # member -> the same search on that member alone
    n_blends: int
    grid: np.ndarray = field(repr=False)  # (n_blends, M): the candidate blends
    presence_members: dict[str, str] = field(default_factory=dict)  # member -> its source
    at_least_one: dict[str, Any] = field(default_factory=dict)  # the rule and its scores

    @property
    def per_blend(self) -> int:
        """Settings per blend on the concatenated binarisation axis (``GridSums.concat``)."""
        return len(self.blend.thresholds) // self.n_blends

    def row_weights(self, fold: int | None) -> np.ndarray:
        """(C, M) blend weights per class: the ones chosen without ``fold`` (its nested
        choice), or the chosen ones (``fold`` None, or a fold without a nested choice)."""
        rows = []
        for name in self.blend.classes:
            result = self.blend.per_class[name]
            setting = result.setting
            if fold is not None and result.nested_settings[fold] is not None:
                setting = int(result.nested_settings[fold])  # type: ignore[arg-type]
            rows.append(self.grid[setting // self.per_blend])
        return np.array(rows)

    def scores(self) -> dict[str, float]:
        """The ensemble's tuned OOF scores as predicted: with the rule when it is scored."""
        if "per_class" in self.at_least_one:
            figures = rule_scores(self.at_least_one)
            return {"in_sample": figures["tuned"], "nested": figures["tuned_nested"]}
        return {"in_sample": self.blend.score, "nested": self.blend.nested_score}

    def uses_presence(self) -> bool:
        """Whether a chosen class setting is gated by the members' presence."""
        return any(self.blend.per_class[c].params.uses_classifier for c in self.blend.classes)


def blend_grid(config: Config, n_members: int) -> np.ndarray:
    """The candidate blends of ``ensemble.weight_step`` (at most ``MAX_BLENDS``)."""
    weights = simplex_weights(n_members, float(config.ensemble.weight_step))
    if len(weights) > MAX_BLENDS:
        raise ValueError(
            f"ensemble.weight_step {config.ensemble.weight_step} gives {len(weights)} blends "
            f"per class for {n_members} members (at most {MAX_BLENDS}); take a larger step"
        )
    return weights


def ensemble_presence(
    config: Config, members: Sequence[Member]
) -> tuple[dict[str, np.ndarray] | None, dict[str, str]]:
    """The members' mean OOF presence (image_id -> (C,)) and which members gave it
    (member -> ``classifier`` or ``head``); (None, {}) when the gates are not searched
    (``postprocess.gates`` lists no classifier gate, the classes have nothing to learn,
    or no member has presence probs)."""
    if not CLASSIFIER_GATES & set(config.postprocess.gates):
        return None, {}
    first = members[0]
    reason = classifier_skip_reason(first.exp.table, first.exp.classes)
    if reason is not None:
        log.info("the classifier gate is left out: %s", reason)
        return None, {}
    tables: dict[str, dict[str, np.ndarray]] = {}
    sources: dict[str, str] = {}
    for i, member in enumerate(members):
        source = presence_source(member.config, member.exp)
        try:
            probs = (
                None if source is None else read_classifier_probs(member.config, member.exp, source)
            )
        except FileNotFoundError as err:
            sets = "".join(f" --set {item}" for item in member.overrides)
            raise FileNotFoundError(
                f"ensemble.members[{i}] ({member.name}; its commands take{sets or ' no --set'}): "
                f"{err}"
            ) from None
        if probs is not None and source is not None:
            tables[member.name], sources[member.name] = probs, source
    if not tables:
        log.warning(
            "no member has presence probs (a trained classifier or a presence head): the "
            "ensemble is tuned without the classifier gate"
        )
        return None, {}
    ids = next(iter(tables.values())).keys()
    mean = {i: np.mean([table[i] for table in tables.values()], axis=0) for i in ids}
    log.info(
        "the classifier gates' presence: the mean of %s",
        ", ".join(f"{name}'s {source}" for name, source in sources.items()),
    )
    return mean, sources


def member_levels(
    members: Sequence[Member], readers: Sequence[Sequence[ProbReader]]
) -> Iterator[tuple[str, int, np.ndarray, tuple[int, int]]]:
    """Stream ``(image_id, fold, (M, C, H, W) levels, original size)``: every member's
    OOF levels of each image, the members' stores checked to hold the same images."""
    first = members[0]
    sizes = read_original_sizes(
        cache_path(first.exp.cache_dir, "train", first.config.data.image_size)
    )
    for fold, fold_readers in enumerate(zip(*readers, strict=True)):
        ids = fold_readers[0].image_ids
        for member, reader in zip(members[1:], fold_readers[1:], strict=True):
            if sorted(reader.image_ids) != sorted(ids):
                raise ValueError(
                    f"fold {fold}: {reader.directory} holds other images than "
                    f"{fold_readers[0].directory} (member {member.name!r})"
                )
        for image_id, q in fold_readers[0].iter():
            levels = [q, *(np.asarray(r.get(image_id)) for r in fold_readers[1:])]
            yield image_id, fold, np.stack(levels), sizes[image_id]


def choose_blend(config: Config, members: Sequence[Member]) -> EnsembleChoice:
    """The one streaming pass over the members' OOF stores: every blend x every setting;
    then the at-least-one rule's pass when the config asks for it."""
    grid = config.postprocess
    first = members[0]
    classes = first.exp.classes
    weights = blend_grid(config, len(members))
    presence, sources = ensemble_presence(config, members)
    gates = searchable_gates(
        grid.gates,
        presence is not None,
        "the members' presence probs",
        "train a member's classifier "
        f"({command_line('train-classifier', '--all', config='<member config>')})",
    )
    readers = [open_segmentation_oof(m.config, m.exp) for m in members]
    accumulators = [
        GridAccumulator(
            classes,
            grid.thresholds,
            grid.min_areas,
            grid.gate_thresholds,
            first.exp.n_folds,
            grid.topk_fraction,
            gates=gates,
            min_components=grid.min_components,
        )
        for _ in weights
    ]
    rles = first.exp.rles()
    for image_id, fold, levels, original in member_levels(members, readers):
        truth = decode_truth(rles[image_id], original, levels.shape[-2:])
        prob = None if presence is None else presence[image_id]
        for accumulator, row in zip(accumulators, weights, strict=True):
            accumulator.add(image_id, fold, blend_levels(list(levels), row), truth, prob)
    parts = [accumulator.sums() for accumulator in accumulators]
    blend = GridSums.concat(parts).result()
    per_blend = len(parts[0].thresholds)
    chosen = {
        name: weights[blend.per_class[name].setting // per_blend].tolist() for name in classes
    }
    alone = {m.name: parts[one_hot_index(weights, i)].result() for i, m in enumerate(members)}
    choice = EnsembleChoice(chosen, blend, alone, len(weights), weights, sources)
    return replace(choice, at_least_one=score_rule(config, members, readers, choice, presence))


def score_rule(
    config: Config,
    members: Sequence[Member],
    readers: Sequence[Sequence[ProbReader]],
    choice: EnsembleChoice,
    presence: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """``postprocess.at_least_one`` for the blend, resolved and scored like tune's: each
    fold's images blended with the weights chosen without that fold (nested), or with
    the chosen ones (in-sample), then post-processed and the rule applied."""
    first = members[0]
    how = str(config.postprocess.at_least_one)
    has_class = every_image_has_a_class(first.exp)
    rule: dict[str, Any] = {
        "choice": how,
        "every_training_image_has_a_class": has_class,
        "applied": resolve_at_least_one(how, has_class),
    }
    if not rule["applied"] and how != "search":
        return rule
    n_folds = first.exp.n_folds
    rows = [choice.row_weights(k) for k in range(n_folds)] + [choice.row_weights(None)]

    def blended(levels: np.ndarray, row: int) -> np.ndarray:
        return blend_levels(list(levels), rows[row])

    rule.update(
        score_at_least_one(
            first.config,
            first.exp,
            readers[0],
            choice.blend,
            presence,
            search=how == "search",
            items=member_levels(members, readers),
            probs_at=blended,
        )
    )
    return rule

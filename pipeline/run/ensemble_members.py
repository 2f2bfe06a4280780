"""An ensemble's member experiments, read and checked (run layer, pure).

``ensemble.members`` names each member's config and its ``--set`` overrides; every
member must be trained, share the ensemble's classes and submission size, and share
one split: byte-identical ``folds.csv`` files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config, load_config
from pipeline.core.layout import FOLDS
from pipeline.run.experiment import Experiment, open_experiment
from pipeline.run.fold_records import check_folds_finished
from pipeline.run.prediction import list_test_images


@dataclass(frozen=True)
class Member:
    """One member experiment: its config (with the overrides named) and its experiment."""

    config: Config
    overrides: tuple[str, ...]
    exp: Experiment

    @property
    def name(self) -> str:
        return str(self.config.experiment)


def parse_members(config: Config) -> list[tuple[Path, tuple[str, ...]]]:
    """(config path, overrides) of each ``ensemble.members`` entry (their form is the
    schema's to check); at least two are needed."""
    members = config.ensemble.members
    if len(members) < 2:
        raise ValueError(
            f"ensemble.members must name at least two experiments; got {len(members)} "
            "(each a config path, or {config: path, set: [KEY=VALUE, ...]})"
        )
    parsed: list[tuple[Path, tuple[str, ...]]] = []
    for item in members:
        if isinstance(item, str):
            parsed.append((Path(item), ()))
        else:
            parsed.append((Path(item["config"]), tuple(item["set"])))
    return parsed


def open_members(config: Config) -> list[Member]:
    """Load every member and check that they can be blended (one split, one task)."""
    members = []
    for i, (path, overrides) in enumerate(parse_members(config)):
        where = f"ensemble.members[{i}]"
        if not path.is_file():
            raise FileNotFoundError(f"{where}: config {str(path)!r} is not a file")
        try:
            member_config = load_config(path, list(overrides))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        # Before open_experiment, which would give an untrained member a run directory.
        check_folds_finished(member_config)
        members.append(Member(member_config, overrides, open_experiment(member_config)))
    names = [m.name for m in members]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"ensemble members must be different experiments; {repeated[0]!r} is named twice "
            "(give each its own experiment=... in its set)"
        )
    if config.experiment in names:
        raise ValueError(
            f"the ensemble's experiment {config.experiment!r} is also a member's; name it apart"
        )
    first = members[0]
    for member in members[1:]:
        if member.exp.classes != first.exp.classes:
            raise ValueError(
                f"ensemble members {first.name!r} and {member.name!r} have different classes: "
                f"{first.exp.classes} and {member.exp.classes}"
            )
        if member.config.data.submission_size != first.config.data.submission_size:
            raise ValueError(
                f"ensemble members {first.name!r} and {member.name!r} store their probs at "
                f"different sizes (data.submission_size {first.config.data.submission_size} "
                f"and {member.config.data.submission_size})"
            )
    ours, theirs = config.to_dict()["data"], first.config.to_dict()["data"]
    differing = [key for key in ours if ours[key] != theirs.get(key)]
    if differing:
        key = differing[0]
        raise ValueError(
            f"the ensemble's data.{key} ({ours[key]!r}) differs from its first member's "
            f"({theirs.get(key)!r}): the ensemble predicts its members' data; make them equal"
        )
    test_ids = list_test_images(first.config, first.exp)
    for member in members[1:]:
        if list_test_images(member.config, member.exp) != test_ids:
            raise ValueError(
                f"ensemble members {first.name!r} and {member.name!r} have different test "
                "images (data.test_images / data.sample_submission)"
            )
    splits = []
    for member in members:
        path = member.config.run_dir / FOLDS
        if not path.is_file():
            raise FileNotFoundError(
                f"ensemble member {member.name!r} has no split ({path}); train it first"
            )
        splits.append((path, path.read_bytes()))
    base_path, base_bytes = splits[0]
    for path, content in splits[1:]:
        if content != base_bytes:
            raise ValueError(
                f"ensemble members must share one split: {path} differs from {base_path}; "
                "train the members with the same data, folds and seed"
            )
    return members

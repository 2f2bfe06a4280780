"""An exported bundle's manifest and its checks (pure layer).

A bundle is one folder (``pipeline.export`` writes it) holding every fold's network in
one or more formats, ``postprocess.json``, the runner's own code (``runner/``) with its
``requirements.txt``, and ``manifest.json``: the prediction plan (classes, input size,
TTA views and merge, post-processing, submission layout and size), how the network
takes its input, the precision, the cross-validation figures (labelled), the config and
package versions it came from, and the SHA-256 of every other member.

``read_manifest`` checks a bundle before any image is read: the manifest parses and is
of a format this code reads, every member it lists is there with its checksum, and the
plan is valid. Each failure is a ValueError or FileNotFoundError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.images import IMAGE_CHANNELS, IMAGE_RESIZE
from pipeline.core.prediction_plan import PredictionPlan

MANIFEST = "manifest.json"
FORMAT = "foldseg-bundle"
# Raised when what a manifest holds changes so that older runners cannot read it.
FORMAT_VERSION = 1
# The network formats a bundle may hold, by the folder they live in.
SAVEDMODEL = "savedmodel"
OPENVINO = "openvino"
ONNX = "onnx"
NETWORK_FORMATS: tuple[str, ...] = (SAVEDMODEL, OPENVINO, ONNX)
# The roles of a bundle's networks: the segmentation folds, and the presence classifier's
# folds where the tuned post-processing gates on them.
SEGMENTATION = "segmentation"
PRESENCE = "presence"
RUNNER = "runner"
REQUIREMENTS = "requirements.txt"
# What every network takes: float32 RGB in 0-255, NHWC; it normalises inside. The image
# files' channel counts that are read as that RGB (the training side's rule, refused
# otherwise: ``core.images.read_image``).
INPUT = {
    "layout": "NHWC",
    "dtype": "float32",
    "channels": "RGB",
    "model_channels": 3,
    "image_channels": list(IMAGE_CHANNELS),
    "range": [0, 255],
    "normalisation": "inside the network (its first layer)",
    "resize": f"cv2.{IMAGE_RESIZE} to input_size",
}
# How a run names its test images in a submission: file names or bare stems.
ID_STYLES: tuple[str, ...] = ("names", "stems")


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_members(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but the manifest, by its POSIX path relative to the
    folder (sorted), with its SHA-256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in files
        if p.relative_to(folder).as_posix() != MANIFEST
    }


@dataclass(frozen=True)
class Manifest:
    """A checked bundle: its folder, plan and networks.

    ``networks``: by format, then by role, the member paths of each fold in order
    (``{"openvino": {"segmentation": ["openvino/segmentation_fold0.xml", ...]}}``).
    ``id_style``: how submission rows name images (``names`` or ``stems``).
    """

    folder: Path
    plan: PredictionPlan
    networks: Mapping[str, Mapping[str, Sequence[str]]]
    precision: str
    id_style: str
    data: Mapping[str, Any]

    @property
    def image_channels(self) -> tuple[int, ...]:
        """The image files' channel counts the model takes (older bundles: the default)."""
        recorded = self.data.get("input", {}).get("image_channels")
        return tuple(int(c) for c in recorded) if recorded else IMAGE_CHANNELS

    @property
    def formats(self) -> list[str]:
        """The network formats this bundle holds."""
        return list(self.networks)

    def paths(self, network_format: str, role: str) -> list[Path]:
        """The folds' files of one role in one format (empty when the bundle has none)."""
        return [self.folder / member for member in self.networks[network_format].get(role, [])]


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check a bundle's manifest and members (see the module docstring).

    Raises:
        FileNotFoundError: no such folder, no manifest, a member it lists is missing.
        ValueError: a manifest that is not JSON, of another or newer format, a checksum
            that does not match, a malformed plan.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(f"bundle {str(folder)!r} is {what}; export one with foldseg export")
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"bundle {str(folder)!r} has no {MANIFEST}: a partial bundle?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): a damaged bundle") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (no format: {FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this runner reads up to "
            f"{FORMAT_VERSION}: a bundle from a newer foldseg, update the runner"
        )
    members = data.get("members")
    if not isinstance(members, dict) or not members:
        raise ValueError(f"{path}: members must map each file to its SHA-256")
    for member, expected in members.items():
        file = folder / member
        if not file.is_file():
            raise FileNotFoundError(f"bundle member {str(file)!r} is missing: a partial bundle")
        if sha256_file(file) != expected:
            raise ValueError(
                f"bundle member {str(file)!r} does not match its SHA-256 in {path}: "
                "a damaged bundle; copy or export it again"
            )
    plan = PredictionPlan.from_dict(_mapping(data, "plan", path), f"{path}: plan")
    networks = _networks(data, members, path)
    id_style = data.get("id_style")
    if id_style not in ID_STYLES:
        raise ValueError(f"{path}: id_style must be one of {list(ID_STYLES)}; got {id_style!r}")
    return Manifest(folder, plan, networks, str(data.get("precision", "auto")), id_style, data)


def _mapping(data: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key} must be a mapping; got {type(value).__name__}")
    return value


def _networks(
    data: Mapping[str, Any], members: Mapping[str, str], path: Path
) -> dict[str, dict[str, list[str]]]:
    networks: dict[str, dict[str, list[str]]] = {}
    for network_format, roles in _mapping(data, "networks", path).items():
        if network_format not in NETWORK_FORMATS:
            raise ValueError(
                f"{path}: network format {network_format!r} is not one of {list(NETWORK_FORMATS)}"
            )
        if not isinstance(roles, dict) or SEGMENTATION not in roles:
            raise ValueError(f"{path}: networks.{network_format} lacks {SEGMENTATION!r} folds")
        networks[network_format] = {}
        for role, files in roles.items():
            if role not in (SEGMENTATION, PRESENCE) or not isinstance(files, list) or not files:
                raise ValueError(f"{path}: networks.{network_format}.{role} must list fold files")
            for member in files:
                listed = member if network_format != SAVEDMODEL else f"{member}/saved_model.pb"
                if listed not in members:
                    raise ValueError(f"{path}: network {member!r} is not among the members")
            networks[network_format][role] = [str(member) for member in files]
    if not networks:
        raise ValueError(f"{path}: the bundle holds no network")
    return networks

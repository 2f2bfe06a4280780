"""The tracker a stage logs to, and the tags that find MLflow runs again (pure run layer).

``Tracker`` itself logs nothing (``tracking.backend: none``); ``run.mlflow_tracker``'s
``MlflowRun`` logs to MLflow. ``run.tracking`` opens one and records a run's files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# Tags that find runs again: the experiment's run directory (absolute) and a fold's id.
TAG_RUN_DIR = "foldseg.run_dir"
TAG_EXPERIMENT = "foldseg.experiment"
TAG_FOLD = "foldseg.fold"
TAG_KIND = "foldseg.kind"
# A grid, an ensemble or a pseudo-label round: the run directories of its members.
TAG_MEMBERS = "foldseg.members"
TAG_PARENT = "mlflow.parentRunId"


class Tracker:
    """Where a stage logs; this base class logs nothing (``tracking.backend: none``).

    ``fold(stage, k, fold_dir, resume)`` is the nested run of one fold: ``resume``
    continues the run whose id the fold directory keeps, else a new one starts.
    """

    enabled = False

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log ``params`` (dotted keys); keys the run already has keep their value."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric figures (non-finite ones are left out), at ``step`` when given."""

    def log_history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch rows (``epoch`` 1-based and figures); epochs already logged are skipped."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Copy the file ``path`` into the run's artifacts (under ``folder``)."""

    def fold(self, stage: str, fold: int, fold_dir: Path, resume: bool = False) -> Tracker:
        """The nested run of fold ``fold`` of ``stage`` (segmentation or classifier)."""
        return self

    def finish(self, failed: bool = False) -> None:
        """Mark the run finished (or failed)."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, None when nothing is tracked."""
        return None

    @property
    def run_dir(self) -> Path | None:
        """The run directory of the experiment this run belongs to."""
        return None


NULL_TRACKER = Tracker()

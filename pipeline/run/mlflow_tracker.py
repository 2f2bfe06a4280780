"""The MLflow side of ``run.tracking``: the only module that imports mlflow (run layer).

Imported by ``tracking.open_tracker`` only when ``tracking.backend`` is ``mlflow``. Every
call to the store goes through ``_Store.call``: the first failure (the store cannot be
reached, created or written, mlflow is not installed) is logged once as a warning naming
the store and the command that uploads the run later, and from then on this process
logs nothing more to that store; the stage itself goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.layout import TRACKING_ARTIFACTS, TRACKING_RUN
from pipeline.run.json_files import write_json
from pipeline.run.tracker import (
    NULL_TRACKER,
    TAG_EXPERIMENT,
    TAG_FOLD,
    TAG_PARENT,
    TAG_RUN_DIR,
    Tracker,
)

log = logging.getLogger(__name__)

# An unreachable server is given up on at once rather than retried for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# The stores this process found unusable (each reported once).
_BROKEN: set[str] = set()

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (MLflow's limit); metrics go 1000 at a time

T = TypeVar("T")


class _Store:
    """One tracking store: its client, MLflow experiment id and failure state."""

    def __init__(self, uri: str, retry_hint: str) -> None:
        self.uri = uri
        self.retry_hint = retry_hint
        self.client: Any = None
        self.experiment_id = ""

    @property
    def broken(self) -> bool:
        return self.uri in _BROKEN

    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None once the store has failed (reported once per process)."""
        if self.broken:
            return None
        try:
            return fn()
        except Exception as exc:  # any failure of the store: tracking is never in the way
            self.fail(what, exc)
            return None

    def fail(self, what: str, exc: BaseException) -> None:
        if self.broken:
            return
        _BROKEN.add(self.uri)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "experiment tracking is off for the rest of this command: the MLflow store %s "
            "could not be used (%s: %s: %s); the run goes on, and %s uploads it later",
            self.uri,
            what,
            type(exc).__name__,
            reason[:300],
            self.retry_hint,
        )

    def connect(self, experiment: str) -> None:
        from mlflow.tracking import MlflowClient  # only when tracking is on

        location = None
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///") :])
            db.parent.mkdir(parents=True, exist_ok=True)
            location = (db.parent / TRACKING_ARTIFACTS).resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location
                )
                return
            except Exception:  # made meanwhile by another process?
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        self.experiment_id = found.experiment_id

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """The oldest live run carrying ``tags``."""
        clauses = " and ".join(f"tags.`{k}` = '{_quoted(v)}'" for k, v in tags.items())
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=clauses,
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_run(self, tags: Mapping[str, str], name: str) -> str:
        run = self.client.create_run(self.experiment_id, tags=dict(tags), run_name=name)
        return str(run.info.run_id)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


class MlflowRun(Tracker):
    """One MLflow run (the experiment's, or a fold's nested in it)."""

    enabled = True

    def __init__(self, store: _Store, run_id: str, run_dir: Path) -> None:
        self.store = store
        self._run_id = run_id
        self._run_dir = run_dir
        self._steps: set[int] | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def run_dir(self) -> Path | None:
        return self._run_dir

    def _log_batch(self, **items: list[Any]) -> None:
        client = self.store.client
        for key, values in items.items():
            size = 1000 if key == "metrics" else BATCH
            for start in range(0, len(values), size):
                batch = {key: values[start : start + size]}
                self.store.call(f"logging {key}", partial(client.log_batch, self._run_id, **batch))

    def _data(self) -> Any:
        run = self.store.call("reading the run", lambda: self.store.client.get_run(self._run_id))
        return None if run is None else run.data

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        data = self._data()
        if data is None:
            return
        new = [
            Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in data.params
        ]
        self._log_batch(params=new)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if step is None:
            data = self._data()
            if data is None:
                return
            finite = {k: v for k, v in finite.items() if data.metrics.get(k) != v}
        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(k, v, now, step or 0) for k, v in finite.items()])

    def log_history(self, rows: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric

        if self._steps is None:
            history = self.store.call(
                "reading the run's history",
                lambda: self.store.client.get_metric_history(self._run_id, "lr"),
            )
            if history is None:
                return
            self._steps = {int(m.step) for m in history}
        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            step = int(row["epoch"])
            if step in self._steps:
                continue
            self._steps.add(step)
            metrics += [
                Metric(k, float(v), now, step)
                for k, v in row.items()
                if k != "epoch" and _finite(v)
            ]
        self._log_batch(metrics=metrics)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._log_batch(tags=[RunTag(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.store.call(
            f"uploading {path.name}",
            lambda: self.store.client.log_artifact(self._run_id, str(path), folder),
        )

    def fold(self, stage: str, fold: int, fold_dir: Path, resume: bool = False) -> Tracker:
        fold_id = f"{stage}/{fold}"
        record = fold_dir / TRACKING_RUN
        run_id = stored = None
        if resume:
            stored = self.store.call("finding the fold's run", lambda: self._stored(record))
            if self.store.broken:
                return NULL_TRACKER
            run_id = stored
            if run_id is None:
                run_id = self.store.call(
                    "finding the fold's run",
                    lambda: self.store.find_run({TAG_PARENT: self._run_id, TAG_FOLD: fold_id}),
                )
        if run_id is None:
            tags = {TAG_PARENT: self._run_id, TAG_FOLD: fold_id, "foldseg.fold_dir": str(fold_dir)}
            run_id = self.store.call(
                "starting the fold's run",
                lambda: self.store.start_run(tags, f"{stage} fold {fold}"),
            )
        else:
            self.store.call("reopening the fold's run", lambda: self.store.reopen(run_id))
        if run_id is None or self.store.broken:
            return NULL_TRACKER
        if run_id != stored:
            write_json(record, {"run_id": run_id, "tracking_uri": self.store.uri})
        return MlflowRun(self.store, run_id, self._run_dir)

    def _stored(self, record: Path) -> str | None:
        """The run id the fold directory keeps, if that run is in this store and alive."""
        if not record.is_file():
            return None

        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.store.uri:
            return None
        run_id = str(saved.get("run_id"))
        try:
            run = self.store.client.get_run(run_id)
        except Exception:  # not in this store (it was replaced): a new run
            return None
        return None if run.info.lifecycle_stage == "deleted" else run_id

    def finish(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self.store.call(
            "closing the run", lambda: self.store.client.set_terminated(self._run_id, status)
        )


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def open_run(uri: str, experiment: str, name: str, run_dir: Path, retry_hint: str) -> Tracker:
    """The MLflow run of the experiment ``name`` (found by its run directory, else
    created) in the MLflow experiment ``experiment`` of the store ``uri``; a do-nothing
    ``Tracker`` when the store cannot be used (reported once)."""
    store = _Store(uri, retry_hint)
    if store.broken:
        return NULL_TRACKER
    where = str(Path(run_dir).resolve())

    def attach() -> str:
        store.connect(experiment)
        run_id = store.find_run({TAG_RUN_DIR: where})
        if run_id is None:
            return store.start_run({TAG_RUN_DIR: where, TAG_EXPERIMENT: name}, name)
        store.reopen(run_id)
        return run_id

    run_id = store.call("opening the experiment's run", attach)
    if run_id is None:
        return NULL_TRACKER
    return MlflowRun(store, run_id, Path(where))

"""This process's place in a multi-worker cluster (``train.strategy: multi_worker``).

``TF_CONFIG`` (JSON) names the cluster and this task, as TensorFlow's
``MultiWorkerMirroredStrategy`` reads it: ``{"cluster": {"worker": ["host:port", ...]},
"task": {"type": "worker", "index": 0}}``, optionally with a ``chief`` job. The chief
(the ``chief`` task, or worker 0 when there is none) writes the fold's files; every other
worker writes nothing shared (its copies go to a scratch directory). TensorFlow-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

TF_CONFIG = "TF_CONFIG"
# Where a non-chief worker writes its private copies (default: a temporary directory
# removed at the end); set it to keep them, e.g. to compare weights with the chief's.
WORKER_DIR_ENV = "FOLDSEG_WORKER_DIR"


# The key of a non-chief worker's fold result (it has no figures: the chief reports them).
WORKER_KEY = "worker"


def worker_summary(results: list[dict[str, object]]) -> str:
    """What a non-chief worker's command prints instead of the fold figures."""
    folds = ", ".join(str(r["fold"]) for r in results)
    return f"{results[0][WORKER_KEY]}: trained fold(s) {folds}; the chief wrote and reports them"


@dataclass(frozen=True)
class WorkerRole:
    """This task: its ``task_type`` and ``index``, the cluster's ``n_workers`` (chief
    included) and whether it is the chief."""

    task_type: str
    index: int
    n_workers: int
    is_chief: bool

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.index}"


def worker_role(environ: Mapping[str, str]) -> WorkerRole:
    """Parse ``TF_CONFIG``; ValueError with what is wrong and what was expected."""
    text = environ.get(TF_CONFIG, "")
    if not text.strip():
        raise ValueError(
            "train.strategy is multi_worker but TF_CONFIG is not set: give every worker "
            'TF_CONFIG={"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": K}} (see docs/scale.md)'
        )
    try:
        spec = json.loads(text)
        cluster, task = spec["cluster"], spec["task"]
        task_type, index = str(task["type"]), int(task["index"])
        jobs = {name: list(addresses) for name, addresses in cluster.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"TF_CONFIG is not valid ({type(exc).__name__}: {exc}); expected JSON with "
            f'"cluster" (job name -> list of host:port) and "task" ({{"type", "index"}})'
        ) from None
    if task_type not in jobs or not 0 <= index < len(jobs[task_type]):
        raise ValueError(
            f"TF_CONFIG's task {task_type} {index} is not in its cluster "
            f"{ {name: len(a) for name, a in jobs.items()} }"
        )
    workers = len(jobs.get("worker", [])) + len(jobs.get("chief", []))
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and not jobs.get("chief"))
    return WorkerRole(task_type, index, workers, chief)

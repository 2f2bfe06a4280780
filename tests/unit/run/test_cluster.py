"""pipeline.run.cluster: this process's role from TF_CONFIG; the jobs section of config."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import DEFAULT_CONFIG, ConfigError, load_config
from pipeline.run.cluster import WorkerRole, worker_role, worker_summary


def tf_config(cluster: dict, task_type: str, index: int) -> dict[str, str]:
    return {
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})
    }


def test_worker_zero_is_the_chief_unless_the_cluster_has_one() -> None:
    two = {"worker": ["a:1", "b:1"]}
    assert worker_role(tf_config(two, "worker", 0)) == WorkerRole("worker", 0, 2, True)
    assert worker_role(tf_config(two, "worker", 1)) == WorkerRole("worker", 1, 2, False)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert worker_role(tf_config(with_chief, "chief", 0)).is_chief
    role = worker_role(tf_config(with_chief, "worker", 0))
    assert not role.is_chief and role.n_workers == 3 and role.name == "worker 0"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "TF_CONFIG is not set"),
        ({"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid"),
        ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}})}, "TF_CONFIG is not valid"),
        (tf_config({"worker": ["a:1"]}, "worker", 1), "task worker 1 is not in its cluster"),
        (tf_config({"worker": ["a:1"]}, "ps", 0), "task ps 0 is not in its cluster"),
    ],
)
def test_a_bad_tf_config_is_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        worker_role(environ)


def test_a_workers_summary_names_it_and_its_folds() -> None:
    text = worker_summary([{"fold": 0, "worker": "worker 1"}, {"fold": 2, "worker": "worker 1"}])
    assert text == "worker 1: trained fold(s) 0, 2; the chief wrote and reports them"


def test_the_jobs_section_is_checked() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert dict(config.jobs) == {
        "executor": "local",
        "address": None,
        "cpus_per_job": None,
        "gpus_per_job": 0.0,
    }
    good = load_config(
        DEFAULT_CONFIG,
        ["jobs.executor=ray", "jobs.address=auto", "jobs.cpus_per_job=4", "jobs.gpus_per_job=0.5"],
    )
    assert good.jobs.cpus_per_job == 4.0 and good.jobs.gpus_per_job == 0.5
    for override, message in [
        ("jobs.executor=slurm", "'jobs.executor' must be one of \\['local', 'ray'\\]"),
        ("jobs.cpus_per_job=0", "'jobs.cpus_per_job' must be null or a number > 0"),
        ("jobs.cpus_per_job=many", "'jobs.cpus_per_job' must be null or a number > 0"),
        ("jobs.gpus_per_job=-1", "'jobs.gpus_per_job' must be a number >= 0"),
        ("jobs.address=[1]", "'jobs.address' must be null or a string; got \\[1\\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(DEFAULT_CONFIG, [override])

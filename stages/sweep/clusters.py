"""dask-jobqueue clusters (SLURM, PBS, ...), configured by dask's own configuration.

A user sets the job's resources where dask-jobqueue reads them (`~/.config/dask/jobqueue.yaml`, or
`DASK_JOBQUEUE__SLURM__CORES=...` variables), e.g.

    jobqueue:
      slurm:
        cores: 8          # per job
        processes: 8      # workers per job: one thread each
        memory: 32GB
        walltime: "04:00:00"
        queue: gpu

`job_script(kind)` is the batch script such a cluster submits for each job (shown by
`pipeline sweep --cluster slurm --dry-run`); `start_jobqueue_cluster(kind)` starts the scheduler here
and submits jobs when the engine scales it.
"""

from __future__ import annotations

from cache.errors import UserError
from cache.extras import require

KINDS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "moab": "MoabCluster",
    "oar": "OARCluster",
    "htcondor": "HTCondorCluster",
}


class ClusterConfigError(UserError, ValueError):
    """dask's configuration cannot describe a job of the requested cluster kind."""


def _cluster_class(kind: str):
    dask_jobqueue = require("dask_jobqueue", "cluster", f"a {kind} cluster")
    return getattr(dask_jobqueue, KINDS[kind])


def _fix_message(kind: str, error: Exception) -> ClusterConfigError:
    return ClusterConfigError(
        f"dask-jobqueue cannot make a {kind} job from dask's configuration: {' '.join(str(error).split())}. Set "
        f"jobqueue.{kind}.cores and "
        f"jobqueue.{kind}.memory (and queue, walltime, ...) in ~/.config/dask/jobqueue.yaml, or as "
        f"DASK_JOBQUEUE__{kind.upper()}__CORES=8 and DASK_JOBQUEUE__{kind.upper()}__MEMORY=32GB"
    )


def job_script(kind: str) -> str:
    """The batch script a `kind` cluster would submit per job (no scheduler is started)."""
    job_class = _cluster_class(kind).job_cls
    try:
        return job_class("tcp://<scheduler-address>:8786", name="dummy-name").job_script()
    except ValueError as error:
        raise _fix_message(kind, error) from None


def start_jobqueue_cluster(kind: str, *, dashboard: bool = False):
    """A `kind` cluster with no jobs yet; the dashboard only if asked for."""
    import dask

    options = dict(dask.config.get(f"jobqueue.{kind}.scheduler-options", {}) or {})
    if not dashboard:
        options["dashboard_address"] = None
    try:
        return _cluster_class(kind)(scheduler_options=options)
    except ValueError as error:
        raise _fix_message(kind, error) from None

"""Where a sweep's tasks run: in this process, or on dask.distributed.

    with open_engine(EngineOptions(workers=4)) as engine:      # a LocalCluster on 127.0.0.1
        engine.run(payloads, on_done)

- no option: in this process, one task after the other (as `pipeline probe` always ran);
- `workers=N`: a `LocalCluster` of N worker processes (`threads_per_worker` each, 1 by default) on the
  loopback interface, without a dashboard unless `dashboard`;
- `scheduler=ADDRESS`: a scheduler that is already running (`dask scheduler`, a cluster manager);
- `cluster=KIND`: a dask-jobqueue cluster (slurm, pbs, ...) configured by dask's own configuration
  (`jobqueue.yaml`), scaled to `scale` workers (`stages.sweep.clusters`).

Before anything is submitted the driver compares its code and library versions with every worker's
(`stages.sweep.versions`); each task checks again when it starts. A worker that dies mid-task is
replaced (by its nanny, or the cluster) and dask reschedules the task; a task that kills
`distributed.scheduler.allowed-failures` workers is reported. Nothing is lost either way: finished
tasks' results are already on disk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cache.errors import ConfigError, UserError
from stages.sweep.clusters import KINDS, start_jobqueue_cluster
from stages.sweep.task import run_task
from stages.sweep.versions import check_same, environment

log = logging.getLogger(__name__)


class SchedulerUnreachableError(UserError, ConnectionError):
    """No dask scheduler answered at the given address."""


class ClusterStartError(UserError, RuntimeError):
    """The local cluster did not start (its workers kept dying while starting); nothing of the sweep ran."""


# A worker that dies while the local cluster starts (killed, out of memory under load) fails the whole start
# ("Nanny failed to start"): the cluster is started again, this many times in all.
START_ATTEMPTS = 3


class TaskFailedError(UserError, RuntimeError):
    """A task could not finish (its workers kept dying); the results of the other tasks are kept."""


@dataclass(frozen=True)
class EngineOptions:
    """How to run a sweep's tasks (see the module docstring); all None: in this process."""

    workers: int | None = None
    scheduler: str | None = None
    cluster: str | None = None
    scale: int | None = None
    threads_per_worker: int = 1
    dashboard: bool = False
    connect_timeout: float = 30.0

    def __post_init__(self):
        chosen = [name for name in ("workers", "scheduler", "cluster") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ConfigError(
                "give one of --workers, --scheduler and --cluster, not " + " and ".join("--" + c for c in chosen)
            )
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise ConfigError(
                f"--workers {self.workers}: give 1 or more local worker processes, or leave --workers "
                "out to run in this process"
            )
        if self.cluster is not None and self.cluster not in KINDS:
            raise ConfigError(
                f"unknown --cluster {self.cluster!r}; dask-jobqueue kinds are {', '.join(KINDS)} "
                "(for a running cluster give --scheduler ADDRESS)"
            )
        if self.scale is not None and self.cluster is None:
            raise ConfigError("--scale sizes a --cluster; with --workers give the number there")
        if self.scale is not None and self.scale < 1:
            raise ConfigError(f"--scale {self.scale}: give 1 or more workers")
        if self.threads_per_worker < 1:
            raise ConfigError(f"--threads-per-worker {self.threads_per_worker}: give 1 or more")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise ConfigError("--scheduler needs an address such as tcp://10.0.0.5:8786")
        if not self.connect_timeout > 0:
            raise ConfigError(f"--connect-timeout {self.connect_timeout}: give a positive number of seconds")

    @property
    def in_process(self) -> bool:
        return self.workers is None and self.scheduler is None and self.cluster is None

    def describe(self) -> str:
        if self.workers is not None:
            return f"a local cluster of {self.workers} worker process(es), {self.threads_per_worker} thread(s) each"
        if self.scheduler is not None:
            return f"the dask scheduler at {self.scheduler}"
        if self.cluster is not None:
            return f"a {self.cluster} cluster (dask-jobqueue) of {self.scale or 1} worker(s)"
        return "this process"


OnDone = Callable[[dict], None]


class InProcess:
    """Runs the tasks here, one after the other."""

    dashboard = None

    def run(self, payloads: list[dict], on_done: OnDone) -> None:
        for payload in payloads:
            on_done(run_task(payload))


class Distributed:
    """Runs the tasks on a dask.distributed client; `on_done` is called as each finishes, in any order."""

    def __init__(self, client, dashboard: str | None = None):
        self.client, self.dashboard = client, dashboard

    def check_versions(self) -> None:
        mine = environment()
        for address, theirs in sorted(self.client.run(environment).items()):
            check_same(mine, theirs, address)

    def run(self, payloads: list[dict], on_done: OnDone) -> None:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        # keys name the task: a future the scheduler already holds for the same task is shared, not rerun
        futures = [self.client.submit(run_task, p, key=f"probe-task-{p['key']}", pure=False) for p in payloads]
        try:
            for future in as_completed(futures):
                try:
                    on_done(future.result())
                except KilledWorker as error:
                    raise TaskFailedError(
                        f"a task of {future.key} was running on every worker that died ({error}); it may need more "
                        "memory than a worker has. Finished tasks are kept: fix the cause and run the sweep again"
                    ) from None
        finally:
            self.client.cancel([f for f in futures if not f.done()])


@contextlib.contextmanager
def open_engine(options: EngineOptions) -> Iterator[InProcess | Distributed]:
    """The engine `options` asks for, started (and its cluster shut down when the block ends)."""
    if options.in_process:
        yield InProcess()
        return
    from cache.extras import require

    require("distributed", "cluster", "a sweep on dask.distributed (--workers, --scheduler, --cluster)")
    from distributed import Client

    with contextlib.ExitStack() as stack:
        if options.workers is not None:
            # The scheduler always serves HTTP (health, metrics); without --dashboard on a free loopback port
            # and without the dashboard's pages.
            cluster = stack.enter_context(_local_cluster(options))
            client = stack.enter_context(Client(cluster))
        elif options.cluster is not None:
            cluster = stack.enter_context(start_jobqueue_cluster(options.cluster, dashboard=options.dashboard))
            cluster.scale(options.scale or 1)
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(_connect(options.scheduler, options.connect_timeout))
        engine = Distributed(client, client.dashboard_link if options.dashboard or options.scheduler else None)
        if engine.dashboard:
            log.info("dask dashboard: %s", engine.dashboard)
        log.info("running on %s", options.describe())
        engine.check_versions()  # the workers there now; later ones are checked by each task
        yield engine


def _local_cluster(options: EngineOptions):
    """A LocalCluster of `options.workers` processes on 127.0.0.1, started again where a worker died while it
    started; a ClusterStartError when it never starts."""
    from distributed import LocalCluster

    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return LocalCluster(
                n_workers=options.workers,
                threads_per_worker=options.threads_per_worker,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:8787" if options.dashboard else "127.0.0.1:0",
                scheduler_kwargs={"dashboard": options.dashboard},
                silence_logs=logging.CRITICAL,
            )  # task errors reach the driver; shutdown chatter need not
        except (RuntimeError, OSError, TimeoutError) as error:  # "Nanny failed to start", a start-up timeout
            cause = error.__cause__ or error
            why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            if attempt == START_ATTEMPTS:
                raise ClusterStartError(
                    f"the local dask cluster of {options.workers} worker(s) did not start in {START_ATTEMPTS} tries "
                    f"(a worker died while starting: {why}); nothing ran and finished tasks are kept. Check the "
                    "memory free for the workers, then run the same command again"
                ) from None
            log.warning(
                "the local dask cluster did not start (a worker died while starting: %s); starting it again (%d/%d)",
                why,
                attempt + 1,
                START_ATTEMPTS,
            )
    raise AssertionError("unreachable")


def _connect(address: str, timeout: float):
    from distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as error:
        raise SchedulerUnreachableError(
            f"no dask scheduler answered at {address} within {timeout:g} s ({type(error).__name__}: {error}); check "
            "the address and that the scheduler is running (`dask scheduler`), or raise --connect-timeout"
        ) from None

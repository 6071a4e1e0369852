"""The processes of one extraction job: torchrun (or any launcher that sets the torch.distributed
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or a single process.

    with join_job() as job:          # a single process when WORLD_SIZE is unset or 1
        job.rank, job.world_size, job.is_main
        outcome = job.share(value)   # rank 0's value, on every rank
        job.count(images); job.total()

Rank 0 holds the store (lock or lease, creation, repairs, attributes) and shares the pending work, or
the error that stops the run, with every rank; each rank then takes its share of the pending shards
(`share_of`: every world_size-th one, so each shard has exactly one writer). NCCL with one GPU per
local rank on CUDA, gloo on the CPU. `DistributedSampler` is not used: it pads by repeating samples.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cache.errors import UserError

# Rank 0 opens (and may repair or verify) the store while the others wait for it.
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("PIPELINE_DIST_TIMEOUT", "1800")))


class JobError(UserError):
    """The error that stopped rank 0, raised on every rank with the same message."""


@dataclass
class Job:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device_name(self, requested: str) -> str:
        """One GPU per local rank: `auto` and `cuda` become cuda:<local rank> (shared round-robin where a
        machine runs more processes than it has GPUs)."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def share(self, value=None):
        """Rank 0's `value`, on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- the whole job's progress, for rank 0's bar ----------------------------------------------------
    def count(self, key: str, images: int) -> int:
        """Add `images` to the job-wide counter `key` and return its total (every rank's so far)."""
        if not self.distributed:
            return images
        return int(dist.distributed_c10d._get_default_store().add(f"progress/{key}", int(images)))

    def close(self) -> None:
        if self._initialised and dist.is_initialized():
            dist.destroy_process_group()
            self._initialised = False

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def share_of(items: list, job: Job) -> list:
    """This rank's items: every world_size-th, starting at its rank (disjoint, together all of them)."""
    return list(items)[job.rank :: job.world_size]


def join_job() -> Job:
    """The job this process belongs to, from the torch.distributed environment (a single process without one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Job()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: start the job with torchrun "
            "(or set the torch.distributed environment)"
        )
    if dist.is_initialized():
        return Job(rank, world_size, local_rank)
    cuda = torch.cuda.is_available()
    # NCCL cannot put two ranks on one GPU; where they share one, gloo carries the (small) messages.
    nccl = cuda and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if nccl else "gloo", timeout=TIMEOUT, **({"device_id": torch.device("cuda", local_rank)} if nccl else {})
    )
    return Job(rank, world_size, local_rank, _initialised=True)


@contextlib.contextmanager
def peer_loss_is_one_line(job: Job) -> Iterator[None]:
    """A rank that loses another rank of the job (it died, and torch.distributed's next collective fails)
    stops with one line instead of gloo's or NCCL's traceback; the launcher names the rank that died."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        if not job.distributed or not (
            isinstance(error, dist.DistError) or "gloo" in str(error).lower() or "connection" in str(error).lower()
        ):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise JobError(
            f"rank {job.rank} lost another process of the job ({first[:200]}); finished shards are kept: "
            "run the same command again to resume"
        ) from None

"""`pipeline extract --nproc N`: the same command again under torchrun's standalone launcher.

The launcher (torch.distributed.run's elastic agent) runs in this process, so that when a rank dies
(killed, out of memory) the job ends with one line naming it and how to resume, instead of the
agent's `ChildFailedError` traceback. Finished shards are kept either way: the same command resumes.
"""

from __future__ import annotations

import logging
import sys

from cache.errors import UserError


class RankDiedError(UserError):
    """A process of an `--nproc` job died; the others were stopped."""


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run `pipeline <argv>` in `nproc` processes on this machine (a local rendezvous on a port the OS
    picks); the launcher stops them all when one fails. Returns the job's exit status: 0, or 1 where a
    rank stopped with its own one-line error; a rank that died is a RankDiedError naming it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = without_nproc(sys.argv[1:] if argv is None else argv)
    args = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m", "pipeline", *argv])
    # The agent logs each failure with its own traceback-like report; the line below says it once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode == 1:  # the rank's own error, already printed as one line by each rank
            return 1
        sys.stderr.write("\n")  # the ranks' progress bars end without one
        raise RankDiedError(died(rank, failure.exitcode, nproc)) from None
    return 0


def died(rank: int, exitcode: int, nproc: int) -> str:
    """The one line of a rank that died: which, how, and the command that resumes the job."""
    import signal

    how = f"exit code {exitcode}"
    if exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    return (
        f"rank {rank} of the --nproc {nproc} job died ({how}); the other ranks were stopped. Finished shards "
        "are kept: run the same command again to resume"
    )

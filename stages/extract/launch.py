"""`pipeline extract --nproc N`: the same command again under torchrun's standalone launcher."""

from __future__ import annotations

import subprocess
import sys


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
    picks); torchrun stops them all when one fails. Returns the job's exit status."""
    argv = without_nproc(sys.argv[1:] if argv is None else argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", "pipeline", *argv]
    return subprocess.call(command)

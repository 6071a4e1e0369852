"""The `pipeline` command: wiring only; the work lives in `stages/`, each command in `pipeline/commands/`.

Every command runs inside `Commands.invoke`, the one place errors are handled: a `UserError` (the
project's base for problems the user can fix) prints its message and exits 1; anything else is a
bug and keeps its traceback. Logging is configured once, in the group, for every command, and each
command logs its wall time when it finishes (what `dvc repro` shows per stage). A command's module is
imported only when the command (or the list of commands) is needed: running one command reads only its
own module, which is what a DVC stage depends on.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import time
from collections.abc import MutableMapping

import click

log = logging.getLogger("pipeline")

# Commands that only print something: no wall time in their output.
_UNTIMED = {"blocks", "datasets"}
# Failures of the machine rather than of the code: a full disk, a read-only or forbidden place.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


# Every command: its name and the module of pipeline/commands/ that defines it (under its own name, '-' as '_').
COMMANDS = (
    "blocks",
    "cka",
    "convert-adm",
    "data",
    "datasets",
    "extract",
    "pixels",
    "pretrain",
    "probe",
    "random-init",
    "report",
    "similarity",
    "sweep",
    "verify",
)


class _LazyCommands(MutableMapping):
    """{name: click command} of `COMMANDS`, each module imported when its command is first asked for
    (`Group.add_command` still adds a command object directly)."""

    def __init__(self, names):
        self._names, self._loaded = list(names), {}

    def __setitem__(self, name, command):
        if name not in self._names:
            self._names.append(name)
        self._loaded[name] = command

    def __delitem__(self, name):
        self._names.remove(name)
        self._loaded.pop(name, None)

    def __getitem__(self, name):
        if name not in self._loaded:
            if name not in self._names:
                raise KeyError(name)
            module = name.replace("-", "_")
            self._loaded[name] = getattr(importlib.import_module(f"pipeline.commands.{module}"), module)
        return self._loaded[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(quiet: bool) -> None:
    handler = next((h for h in logging.getLogger().handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logging.getLogger().addHandler(handler)
    level = logging.WARNING if quiet else logging.INFO
    for name in ("pipeline", "stages", "cache"):
        logging.getLogger(name).setLevel(level)
    # A sweep's cluster: its warnings, not its chatter. distributed sets its loggers' levels from dask's config when
    # it is imported (after this, in the sweep), and its worker processes inherit the environment.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    handler.setLevel(level)


class Commands(click.Group):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(COMMANDS)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["pipeline.argv"] = list(args)  # the command line as given, for advice that repeats it
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        started = time.perf_counter()
        try:
            result = super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:
            from cache.errors import UserError

            if isinstance(error, UserError):
                from pipeline.advice import render

                raise click.ClickException(render(error, ctx.meta.get("pipeline.argv"))) from error
            if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
                where = f": {error.filename}" if error.filename else ""
                raise click.ClickException(f"{error.strerror}{where}") from error
            raise
        if ctx.invoked_subcommand and ctx.invoked_subcommand not in _UNTIMED:
            log.info("pipeline %s finished in %.1f s", ctx.invoked_subcommand, time.perf_counter() - started)
        return result


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
def main(quiet: bool) -> None:
    """Extract diffusion U-Net features once into a Zarr cache, then sweep probes over them."""
    _configure_logging(quiet)

"""Output directories of the commands that write one (data, pretrain, random-init, convert-adm, report).

A command writes into a directory that is new, empty, or one it made itself before (recognised by
the files it writes), and replaces its own earlier output only when asked. It builds the new
content beside the target and swaps it in at the end, so a failure or a kill never leaves a
half-written directory, and never a user's own files overwritten.
"""

from __future__ import annotations

from cache.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The output directory holds something this command must not replace; the message says what to do."""

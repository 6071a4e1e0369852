"""Advice: what the command line tells a user to do about a store's error (typed fields: `cache.errors`).

`cache` says what is wrong and what the store needs (`StoreError.remedy`); this is the one place that
turns that into words about commands and flags. Where a command repairs the store by itself it is
printed whole, between backticks, ready to run verbatim (tests run it): every damaged, missing,
foreign or unfinished piece of a store is repaired by

    pipeline verify --store STORE --repair

which verifies the store, marks what is damaged unfinished and recomputes it from the recipe (model,
data, settings) the store records (`stages.extract.repair`).
"""

from __future__ import annotations

import json
import shlex

from cache import errors

# Storage options never printed: credentials belong in the environment, not in logs.
_SECRET_OPTIONS = ("key", "secret", "token", "password", "sas_token", "account_key")


def repair_command(store) -> str:
    """`pipeline verify --store STORE [--storage-option K=V ...] --repair` for a store (a Location or its text)."""
    url, options = (store.url, store.options) if hasattr(store, "url") else (str(store), {})
    parts = ["pipeline", "verify", "--store", url]
    for key, value in _flatten(options):
        if key.rsplit(".", 1)[-1] not in _SECRET_OPTIONS:
            parts += ["--storage-option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return shlex.join([*parts, "--repair"])


def overwrite_command(argv: list[str] | None) -> str | None:
    """The `pipeline extract` command line that failed (`argv`: its arguments after `pipeline`), with
    `--overwrite`: run verbatim, it replaces the store. None for another command, or where the line carries
    a credential (never printed; it belongs in the environment)."""
    if not argv or next((a for a in argv if not a.startswith("-")), None) != "extract":
        return None
    if any(a.split("=", 1)[0].rsplit(".", 1)[-1] in _SECRET_OPTIONS for a in argv if "=" in a):
        return None
    return shlex.join(["pipeline", *argv, *([] if "--overwrite" in argv else ["--overwrite"])])


def render(error: Exception, argv: list[str] | None = None) -> str:
    """The message of a user error, its advice appended on the same line where the error carries a remedy
    (an error is one line: what is wrong, then what to do). `argv`, the failed command's arguments after
    `pipeline`, lets an extraction's advice to replace the store be that command with `--overwrite`."""
    text = str(error).rstrip(". ")
    remedy = getattr(error, "remedy", None)
    store = getattr(error, "store", None)
    if remedy == errors.REPAIR and store is not None:
        return f"{text}. To repair it, run: `{repair_command(store)}`"
    again = overwrite_command(argv)
    if again and remedy == errors.REPLACE:
        return f"{text}. To replace it, run: `{again}`, or write into another --out."
    if again and remedy == errors.RESTORE_DATA:
        return f"{text}. Restore them, or re-extract everything into the store: `{again}`"
    advice = {
        errors.REPLACE: "Extract again with --overwrite (it replaces the store), or into another --out.",
        errors.ELSEWHERE: "Choose another --out.",
        errors.WAIT: "Wait for it to finish, or write to another --out.",
        errors.WIDER_DTYPE: "Try --dtype float32, and --precision fp32 if the model ran in bf16 or fp16.",
        errors.RESTORE_DATA: "Restore them, or re-extract everything with --overwrite.",
        errors.CREATE: f"Make it first: `pipeline extract --out {shlex.quote(str(store))} ...`.",
        errors.RERUN: "Run the `pipeline extract` that made it again, with the same settings: it recomputes what "
        "is now marked unfinished.",
    }.get(remedy)
    return f"{text}. {advice}" if advice else str(error)


def _flatten(options: dict, prefix: str = ""):
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

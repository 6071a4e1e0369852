"""Parameter types and options shared by the commands (click idioms: a ParamType per value syntax)."""

from __future__ import annotations

import click

model_option = click.option(
    "--model",
    required=True,
    help="A UNet2DModel directory (save_pretrained layout) or a Hugging Face Hub id.",
)


def load_or_fail(load, source):
    """Call a loader, turning its user-facing errors into click errors (no traceback)."""
    try:
        return load(source)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error

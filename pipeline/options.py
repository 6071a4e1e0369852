"""Parameter types and options shared by the commands (click idioms: a ParamType per value syntax)."""

from __future__ import annotations

import click

from stages.blocks import parse_block_spec


class IntListType(click.ParamType):
    """A comma list of integers, e.g. `10,90,150`."""

    name = "INTS"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        try:
            numbers = tuple(int(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma list of integers such as 10,90,150", param, ctx)
        if not numbers:
            self.fail("the list is empty", param, ctx)
        return numbers


class BlockSpecType(click.ParamType):
    """Block numbers: `24`, `18-30`, `6,12,18-20` or `all` (checked against the model later)."""

    name = "BLOCKS"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, list):
            return value
        try:
            parse_block_spec(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        return str(value)


INTS = IntListType()
BLOCKS = BlockSpecType()

model_option = click.option(
    "--model",
    required=True,
    help="A UNet2DModel directory (save_pretrained layout) or a Hugging Face Hub id.",
)


def load_or_fail(load, *args, **kwargs):
    """Call a stage function, turning its user-facing errors into click errors (no traceback)."""
    try:
        return load(*args, **kwargs)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise click.ClickException(str(message)) from error

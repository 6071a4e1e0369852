"""Parameter types and options shared by the commands (click idioms: a ParamType per value syntax)."""

from __future__ import annotations

import click

from stages.models.blocks import parse_block_spec


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


def parse_float_list(text: str) -> tuple[float, ...]:
    """'1e-3,0.01, 0.1' -> (0.001, 0.01, 0.1); an empty list or a non-number is an error."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise ValueError("the list is empty")
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a comma list of numbers such as 1e-3,0.01,0.1") from None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
               "t": 1024**4, "tb": 1024**4}


def parse_byte_size(text: str) -> int | None:
    """'auto' -> None; '512MB', '8G', '1.5gb', '1000000' -> bytes (binary units)."""
    value = str(text).strip().lower().replace(" ", "").replace("ib", "b")
    if value == "auto":
        return None
    number = value.rstrip("kmgtb")
    unit = value[len(number):]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size such as 512MB, 8GB or auto") from None
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(size)


def parse_named_path(text: str) -> tuple[str, str]:
    """'pretrained=results/a' -> ('pretrained', 'results/a'); 'results/a/' -> ('a', 'results/a/')."""
    name, sep, path = str(text).partition("=")
    if not sep:
        path = name
        name = path.rstrip("/\\").replace("\\", "/").split("/")[-1] or path
    if not name or not path:
        raise ValueError(f"{text!r} is not PATH or NAME=PATH")
    return name, path


class FloatListType(click.ParamType):
    """A comma list of numbers, e.g. `1e-3,0.01,0.1`."""

    name = "FLOATS"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        try:
            return parse_float_list(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class ByteSizeType(click.ParamType):
    """A memory size such as `8GB`, or `auto` (None)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_byte_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class NamedPathType(click.ParamType):
    """A directory, optionally named: `NAME=PATH` (the name defaults to the directory's own name)."""

    name = "[NAME=]PATH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_named_path(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


FLOATS = FloatListType()
BYTES = ByteSizeType()
NAMED_PATH = NamedPathType()

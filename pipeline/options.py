"""Parameter types and options shared by the commands (click idioms: a ParamType per value syntax).

Each type parses its syntax once and hands the command the resolved value. Nothing here imports
torch: `pipeline --help` and every command's `--help` stay fast.
"""

from __future__ import annotations

import functools
import json
import math
import re

import click

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_block_spec(spec: str) -> list[int] | None:
    """Parse '18-30', '24', '6,12,18-20' or 'all' (None) into sorted unique block numbers.

    Only the syntax is checked here; `stages.models.blocks.resolve_blocks` checks the numbers against a model.
    """
    text = str(spec).strip()
    if text.lower() == "all":
        return None
    numbers: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(
                f"cannot read block list {spec!r}: use numbers and ranges such as '24', '18-30', '6,12,18-20' or 'all'"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"cannot read block range {part.strip()!r} in {spec!r}: the range runs backwards")
        numbers.update(range(first, last + 1))
    return sorted(numbers)


def parse_int_list(text: str, *, minimum: int | None = None, distinct: bool = True) -> tuple[int, ...]:
    """'10,90,150' -> (10, 90, 150): a non-empty comma list of integers of at least `minimum`, distinct
    unless `distinct` is False."""
    try:
        numbers = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a comma list of integers such as 10,90,150") from None
    if not numbers:
        raise ValueError("the list is empty")
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated and distinct:
        raise ValueError(f"{', '.join(map(str, repeated))} appear(s) more than once in {text!r}")
    if minimum is not None and min(numbers) < minimum:
        raise ValueError(f"{text!r} holds {min(numbers)}; every value must be at least {minimum}")
    return numbers


class IntListType(click.ParamType):
    """A comma list of integers of at least `minimum`, e.g. `10,90,150`; distinct unless `distinct` is False."""

    name = "INTS"

    def __init__(self, minimum: int | None = None, *, distinct: bool = True):
        self.minimum, self.distinct = minimum, distinct

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        try:
            return parse_int_list(value, minimum=self.minimum, distinct=self.distinct)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class LevelListType(IntListType):
    """U-Net levels, e.g. `1` or `1,2`, or `none` (an empty tuple)."""

    name = "LEVELS"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "none":
            return ()
        return super().convert(value, param, ctx)


class BlockSpecType(click.ParamType):
    """Block numbers: `24`, `18-30`, `6,12,18-20` or `all`, as a tuple (None: all); checked against the
    model later."""

    name = "BLOCKS"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        try:
            numbers = parse_block_spec(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        return None if numbers is None else tuple(numbers)


class NameListType(click.ParamType):
    """A comma list of distinct names, e.g. the splits `train,val,test`."""

    name = "NAMES"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(part.strip() for part in str(value).split(",") if part.strip())
        if not names:
            self.fail(f"{value!r} names nothing; give a comma list such as train,val", param, ctx)
        if len(set(names)) != len(names):
            self.fail(f"{value!r} names something twice", param, ctx)
        return names


class HeadType(click.Choice):
    """A head kind of `stages.probe.registry`, read when first needed (so that importing the command line
    stays light)."""

    name = "HEAD"

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from stages.probe.registry import HEADS

        return tuple(HEADS)

    @choices.setter
    def choices(self, value):  # click.Choice sets it in __init__
        pass


INTS = IntListType()
TIMESTEPS = IntListType(minimum=0)
POOLS = IntListType(minimum=1)
LEVELS = LevelListType(minimum=0)
SIZES = IntListType(minimum=1, distinct=False)  # layer widths: repeats are fine
SEEDS = IntListType(minimum=0)  # --seeds 0,1,2
SHOTS = IntListType(minimum=1)  # --shots 1,2,5,10,20
BLOCKS = BlockSpecType()
NAMES = NameListType()
HEAD = HeadType()


def shown(value) -> str:
    """A default as the help shows it: lists as comma lists, floats short, booleans as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class SettingsHelpOption(click.Option):
    """An option whose help names defaults read from the settings: each `{name}` in its help becomes
    `defaults()[name]` when the help is first shown. The settings are imported then, not when the command
    line loads (`pipeline --help` stays light), and the help cannot drift from what the stage does."""

    def __init__(self, *decls, defaults, **kwargs):
        super().__init__(*decls, **kwargs)
        self._defaults = defaults

    def get_help_record(self, ctx):
        if self._defaults is not None:
            self.help, self._defaults = self.help.format(**self._defaults()), None
        return super().get_help_record(ctx)


# Help of the options that read a data set (`pipeline extract`, `pipeline pixels`).
DATA_HELP = (
    "The data set: KIND:PATH (e.g. cub:/data/CUB_200_2011), or PATH, whose kind is recognised from its "
    "layout (an image folder <split>/<class>/<image> if none); wds:PATTERN (WebDataset shards) or "
    "hf:PATH_OR_ID[:CONFIG] (Hugging Face datasets); `pipeline datasets` lists the kinds."
)
CLASSES_HELP = (
    "Keep only these classes: a file with one class per line (name or first word, e.g. a wnid), or a "
    "shipped list: imagenet50, imagenet100, imagenet200."
)
SUBSET_HELP = (
    "Keep only these images (in the splits the list names): a file with one image path or file name "
    "per line, or a shipped list: imagenet1pct, imagenet10pct."
)

model_option = click.option(
    "--model",
    required=True,
    help="A UNet2DModel directory (save_pretrained layout) or Hub id; a Stable Diffusion or DiT pipeline "
    "directory; hf:<directory or Hub id> (a transformers vision backbone); timm:<name> (with --checkpoint).",
)


def parse_float_list(text: str) -> tuple[float, ...]:
    """'1e-3,0.01, 0.1' -> (0.001, 0.01, 0.1); an empty list or a non-number is an error."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise ValueError("the list is empty")
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a comma list of numbers such as 1e-3,0.01,0.1") from None


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
}


def parse_byte_size(text: str) -> int | None:
    """'auto' -> None; '512MB', '8G', '1.5gb', '1000000' -> bytes (binary units)."""
    value = str(text).strip().lower().replace(" ", "").replace("ib", "b")
    if value == "auto":
        return None
    number = value.rstrip("kmgtb")
    unit = value[len(number) :]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size such as 512MB, 8GB or auto") from None
    if not math.isfinite(size):
        raise ValueError(f"{text!r} is not a finite size; give one such as 512MB or 8GB, or auto")
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(size)


def split_name(text: str) -> tuple[str | None, str]:
    """'NAME=REST' -> ('NAME', 'REST'); 'REST' -> (None, 'REST'). The one reading of the NAME= prefix.

    An '=' after a '/', a '\\' or a ':' belongs to a path or URL (s3://bucket/run=3/f.zarr), not to a name.
    """
    text = str(text).strip()
    name, sep, rest = text.partition("=")
    if not sep or any(c in name for c in "/\\:"):
        return None, text
    if not name.strip():
        raise ValueError(f"{text!r} has an empty name; write NAME={rest.strip()} or leave out the '='")
    return name.strip(), rest.strip()


def parse_named(text: str, *, suffix: str = "") -> tuple[str, str]:
    """'[NAME=]PATH' -> (NAME, PATH): 'pretrained=results/a' -> ('pretrained', 'results/a'); without NAME=
    the name is the path's last component less `suffix` ('results/a/' -> 'a'; with suffix '.zarr',
    's3://b/adm256.zarr' -> 'adm256'). The name becomes a directory or a label: never empty or hidden."""
    name, path = split_name(text)
    if not path:
        raise ValueError(f"{text!r} names no path; give PATH or NAME=PATH")
    if name is None:
        name = path.rstrip("/\\").replace("\\", "/").split("/")[-1]
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    if not name or name.startswith("."):
        raise ValueError(f"{text!r} gives no usable name ({name!r}); write NAME=PATH")
    return name, path


class ParsedType(click.ParamType):
    """A value read by one of the parsers above (each tested by table); its ValueError becomes click's usage
    error. Values already of the parsed type (defaults, values given from Python) pass through."""

    def __init__(self, name: str, parse, parsed: tuple[type, ...]):
        self.name, self._parse, self._parsed = name, parse, parsed

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, self._parsed):
            return value
        try:
            return self._parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


FLOATS = ParsedType("FLOATS", parse_float_list, (tuple,))  # e.g. 1e-3,0.01,0.1
BYTES = ParsedType("SIZE", parse_byte_size, (int,))  # e.g. 8GB, or auto (None)
NAMED_PATH = ParsedType("[NAME=]PATH", parse_named, (tuple,))  # the name defaults to the directory's own


def parse_storage_option(text: str) -> tuple[tuple[str, ...], object]:
    """'KEY=VALUE' -> (the key's dotted parts, the value): 'anon=true' -> (('anon',), True);
    'client_kwargs.region_name=eu-west-1' -> (('client_kwargs', 'region_name'), 'eu-west-1').

    Values are read as JSON where they parse (`true`, `3`, `{"a": 1}`) and kept as text otherwise.
    """
    key, sep, raw = str(text).partition("=")
    parts = tuple(part.strip() for part in key.split("."))
    if not sep or not all(parts):
        raise ValueError(f"{text!r}: expected KEY=VALUE, e.g. anon=true or client_kwargs.region_name=eu-west-1")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return parts, value


def merge_storage_options(pairs) -> dict:
    """Parsed `--storage-option`s as nested fsspec options; a key given twice (or as both a value and a
    parent of other keys) is an error rather than a silent choice."""
    options: dict = {}
    for parts, value in pairs:
        target = options
        for depth, part in enumerate(parts[:-1]):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"{'.'.join(parts[: depth + 1])} is given a value and also keys below it")
        if parts[-1] in target:
            raise ValueError(f"{'.'.join(parts)} is given twice")
        target[parts[-1]] = value
    return options


STORAGE_OPTION = ParsedType("KEY=VALUE", parse_storage_option, ())


def _storage_options(ctx, param, pairs) -> dict:
    try:
        return merge_storage_options(pairs or ())
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


def storage_option(command):
    """`--storage-option KEY=VALUE`, repeatable: fsspec options of an object store (`cache.storage`), handed
    to the command as one nested dict ({} when none is given)."""
    return click.option(
        "--storage-option",
        "storage_options",
        type=STORAGE_OPTION,
        multiple=True,
        callback=_storage_options,
        help="An fsspec option of an object-store URL (s3://, gs:// ...), e.g. anon=true or "
        "client_kwargs.region_name=eu-west-1; repeat for more. Credentials and endpoints come from the "
        "standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).",
    )(command)


# -- pipeline cka ----------------------------------------------------------------------------------------
def parse_scoped(text: str, parse) -> tuple[str | None, object]:
    """'[NAME=]SPEC' -> (NAME or None, parse(SPEC)): a selection for one store by name, or for all."""
    name, spec = split_name(text)
    return name, parse(spec)


def _parse_scoped_blocks(text: str):
    name, numbers = parse_scoped(text, parse_block_spec)
    return name, None if numbers is None else tuple(numbers)


def _parse_scoped_timesteps(text: str):
    return parse_scoped(text, functools.partial(parse_int_list, minimum=0))


NAMED_STORE = ParsedType("[NAME=]PATH", functools.partial(parse_named, suffix=".zarr"), (tuple,))  # name: the file stem
SCOPED_BLOCKS = ParsedType("[STORE=]BLOCKS", _parse_scoped_blocks, (tuple,))  # e.g. 18-30 or adm=18-30
SCOPED_TIMESTEPS = ParsedType("[STORE=]TIMESTEPS", _parse_scoped_timesteps, (tuple,))  # e.g. 10,90 or adm=10,90


def _parse_store_pool(text: str) -> tuple[str, int]:
    name, pool = parse_scoped(text, lambda spec: int(spec) if spec.strip().isdigit() and int(spec) > 0 else None)
    if name is None or pool is None:
        raise ValueError(f"{text!r} is not NAME=POOL with a positive integer POOL, such as pixels=16")
    return name, pool


STORE_POOL = ParsedType("STORE=POOL", _parse_store_pool, (tuple,))  # e.g. pixels=16


class HeadListType(click.ParamType):
    """A comma list of distinct head kinds of `stages.probe.registry`, e.g. `linear,mlp,logreg`."""

    name = "HEADS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from stages.probe.registry import HEADS

        names = tuple(part.strip() for part in str(value).split(",") if part.strip())
        unknown = [n for n in names if n not in HEADS]
        if not names or unknown:
            self.fail(
                f"{value!r}: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(HEADS)}",
                param,
                ctx,
            )
        if len(set(names)) != len(names):
            self.fail(f"{value!r} names a head twice", param, ctx)
        return names


HEADS = HeadListType()


def engine_options(command):
    """Where a sweep's tasks run (`stages.sweep.engine`): in this process unless one of these is given."""
    decorators = [
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=None,
            help="Run the tasks on a local dask cluster of this many worker processes (127.0.0.1) "
            "[default: in this process].",
        ),
        click.option(
            "--scheduler", default=None, help="Address of a running dask scheduler, e.g. tcp://10.0.0.5:8786."
        ),
        click.option(
            "--cluster",
            default=None,
            help="Start a dask-jobqueue cluster of this kind (slurm, pbs, sge, lsf, moab, oar, htcondor), "
            "configured by dask's configuration (jobqueue.yaml).",
        ),
        click.option(
            "--scale", type=click.IntRange(min=1), default=None, help="Workers of the --cluster [default: 1]."
        ),
        click.option(
            "--threads-per-worker", type=click.IntRange(min=1), default=1, help="Threads of each --workers process."
        ),
        click.option("--dashboard", is_flag=True, help="Start dask's dashboard (its address is logged)."),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=30.0,
            help="Seconds to wait for --scheduler.",
        ),
        click.option(
            "--group-size",
            type=click.IntRange(min=0),
            default=None,
            help="Input sets per task (a task trains its group's whole grid together); 0: whole passes "
            "[default: whole passes for linear and mlp, whose banks batch input sets (bit-identical "
            "to a serial run), 1 for the other heads].",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


ENGINE_FLAGS = ("workers", "scheduler", "cluster", "scale", "threads_per_worker", "dashboard", "connect_timeout")


def data_column_options(command):
    """--image-column and --label-column: where wds: and hf: data keep the image and the label."""
    command = click.option(
        "--label-column",
        default=None,
        help="wds: the field of key.json holding the label [default: key.cls]; hf: the label "
        "column [default: the ClassLabel column].",
    )(command)
    return click.option(
        "--image-column",
        default=None,
        help="wds: the image's extension, e.g. png [default: the first image member]; hf: the image "
        "column [default: the Image column].",
    )(command)

"""Parameter types and options shared by the commands (click idioms: a ParamType per value syntax).

Each type parses its syntax once and hands the command the resolved value. Nothing here imports
torch: `pipeline --help` and every command's `--help` stay fast.
"""

from __future__ import annotations

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


class IntListType(click.ParamType):
    """A comma list of integers of at least `minimum`, e.g. `10,90,150`; distinct unless `distinct` is False."""

    name = "INTS"

    def __init__(self, minimum: int | None = None, *, distinct: bool = True):
        self.minimum, self.distinct = minimum, distinct

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        try:
            numbers = tuple(int(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma list of integers such as 10,90,150", param, ctx)
        if not numbers:
            self.fail("the list is empty", param, ctx)
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        if repeated and self.distinct:
            self.fail(f"{', '.join(map(str, repeated))} appear(s) more than once in {value!r}", param, ctx)
        if self.minimum is not None and min(numbers) < self.minimum:
            self.fail(f"{value!r} holds {min(numbers)}; every value must be at least {self.minimum}", param, ctx)
        return numbers


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
BLOCKS = BlockSpecType()
NAMES = NameListType()
HEAD = HeadType()

# Help of the options that read a data set (`pipeline extract`, `pipeline pixels`).
DATA_HELP = ("The data set: KIND:PATH (e.g. cub:/data/CUB_200_2011), or PATH, whose kind is recognised from its "
             "layout (an image folder <split>/<class>/<image> if none); wds:PATTERN (WebDataset shards) or "
             "hf:PATH_OR_ID[:CONFIG] (Hugging Face datasets); `pipeline datasets` lists the kinds.")
CLASSES_HELP = ("Keep only these classes: a file with one class per line (name or first word, e.g. a wnid), or a "
                "shipped list: imagenet50, imagenet100, imagenet200.")
SUBSET_HELP = ("Keep only these images (in the splits the list names): a file with one image path or file name "
               "per line, or a shipped list: imagenet1pct, imagenet10pct.")

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
    if not math.isfinite(size):
        raise ValueError(f"{text!r} is not a finite size; give one such as 512MB or 8GB, or auto")
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
NAMED_PATH = ParsedType("[NAME=]PATH", parse_named_path, (tuple,))  # the name defaults to the directory's own


def storage_option(command):
    """`--storage-option KEY=VALUE`, repeatable: fsspec options of an object store (`cache.storage`)."""
    return click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        help="An fsspec option of an object-store URL (s3://, gs:// ...), e.g. anon=true or "
             "client_kwargs.region_name=eu-west-1; repeat for more. Credentials and endpoints come from the "
             "standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")(command)


# -- pipeline cka ----------------------------------------------------------------------------------------
def parse_named_store(text: str) -> tuple[str, str]:
    """'features/adm256.zarr' -> ('adm256', 'features/adm256.zarr'); 'adm=features/a.zarr' -> ('adm', ...)."""
    name, path = parse_named_path(text)
    if "=" not in str(text):
        stem = name.rsplit(".", 1)[0] if name.endswith(".zarr") else name
        name = stem or name
    return name, path


def parse_scoped(text: str, parse) -> tuple[str | None, object]:
    """'[NAME=]SPEC' -> (NAME or None, parse(SPEC)): a selection for one store by name, or for all."""
    name, sep, spec = str(text).partition("=")
    if not sep:
        name, spec = None, name
    elif not name.strip():
        raise ValueError(f"{text!r} has an empty store name; write NAME=SPEC or SPEC")
    return (name.strip() if name is not None else None), parse(spec)


def _parse_scoped_blocks(text: str):
    name, numbers = parse_scoped(text, parse_block_spec)
    return name, None if numbers is None else tuple(numbers)


def _parse_scoped_timesteps(text: str):
    def timesteps(spec):
        try:
            values = tuple(int(part) for part in spec.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{spec!r} is not a comma list of integers such as 10,90,150") from None
        if not values or min(values) < 0 or len(set(values)) != len(values):
            raise ValueError(f"{spec!r} must be a comma list of distinct timesteps >= 0, such as 10,90,150")
        return values

    return parse_scoped(text, timesteps)


NAMED_STORE = ParsedType("[NAME=]PATH", parse_named_store, (tuple,))  # the name defaults to the file stem
SCOPED_BLOCKS = ParsedType("[STORE=]BLOCKS", _parse_scoped_blocks, (tuple,))  # e.g. 18-30 or adm=18-30
SCOPED_TIMESTEPS = ParsedType("[STORE=]TIMESTEPS", _parse_scoped_timesteps, (tuple,))  # e.g. 10,90 or adm=10,90


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
            self.fail(f"{value!r}: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from "
                      f"{', '.join(HEADS)}", param, ctx)
        if len(set(names)) != len(names):
            self.fail(f"{value!r} names a head twice", param, ctx)
        return names


HEADS = HeadListType()


def engine_options(command):
    """Where a sweep's tasks run (`stages.sweep.engine`): in this process unless one of these is given."""
    decorators = [
        click.option("--workers", type=int, default=None,
                     help="Run the tasks on a local dask cluster of this many worker processes (127.0.0.1) "
                          "[default: in this process]."),
        click.option("--scheduler", default=None, help="Address of a running dask scheduler, e.g. tcp://10.0.0.5:8786."),
        click.option("--cluster", default=None,
                     help="Start a dask-jobqueue cluster of this kind (slurm, pbs, sge, lsf, moab, oar, htcondor), "
                          "configured by dask's configuration (jobqueue.yaml)."),
        click.option("--scale", type=int, default=None, help="Workers of the --cluster [default: 1]."),
        click.option("--threads-per-worker", type=int, default=1, help="Threads of each --workers process."),
        click.option("--dashboard", is_flag=True, help="Start dask's dashboard (its address is logged)."),
        click.option("--connect-timeout", type=float, default=30.0, help="Seconds to wait for --scheduler."),
        click.option("--group-size", type=click.IntRange(min=0), default=None,
                     help="Input sets per task (a task trains its group's whole grid together); 0: whole passes "
                          "[default: whole passes for linear and mlp, whose banks batch input sets (bit-identical "
                          "to a serial run), 1 for the other heads]."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


ENGINE_FLAGS = ("workers", "scheduler", "cluster", "scale", "threads_per_worker", "dashboard", "connect_timeout")


def data_column_options(command):
    """--image-column and --label-column: where wds: and hf: data keep the image and the label."""
    command = click.option("--label-column", default=None,
                           help="wds: the field of key.json holding the label [default: key.cls]; hf: the label "
                                "column [default: the ClassLabel column].")(command)
    return click.option("--image-column", default=None,
                        help="wds: the image's extension, e.g. png [default: the first image member]; hf: the image "
                             "column [default: the Image column].")(command)

"""The command line's defaults are the settings' defaults.

Every option of every command either has a counterpart in the settings its command builds (a
dataclass field or a keyword of the stage function) or is named below as the command line's own. An
option's click default must equal its counterpart's default, and a `[default: ...]` in its help must
show the counterpart's value (for settings that are None until the stage fills them in, the value it
fills in), so help text cannot drift from what the stage does.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import click
import pytest

from pipeline import options
from pipeline.cli import main


def _fields(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in fields_of(cls)}


def fields_of(cls):
    return [
        f
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]


def _keywords(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _probe() -> dict:
    from stages.probe.registry import default_grid
    from stages.probe.settings import DEFAULTS_OF_NONE, ProbeSettings
    from stages.sweep.engine import EngineOptions

    grids = {
        "Cs": default_grid("logreg"),
        "ks": default_grid("knn"),
        "alphas": default_grid("ridge"),  # None: these
        "solver": ProbeSettings(store="s.zarr", head="linear").solver,
    }
    return {**_fields(ProbeSettings), **DEFAULTS_OF_NONE, **grids, **_fields(EngineOptions)}


def _extract() -> dict:
    from stages.extract.plan import ExtractConfig

    return _fields(ExtractConfig)


def _cka() -> dict:
    from stages.cka.run import CkaSettings

    return _fields(CkaSettings)


def _similarity() -> dict:
    from stages.similarity.run import SimilaritySettings

    return _fields(SimilaritySettings)


def _pretrain() -> dict:
    from stages.pretrain.ddpm import pretrain_ddpm

    return _keywords(pretrain_ddpm)


def _random_init() -> dict:
    from stages.pretrain.random_init import random_init_copy

    return _keywords(random_init_copy)


def _data() -> dict:
    from stages.data.mnist import write_mnist_folder

    return {**_keywords(write_mnist_folder), "per_class": 0}  # the command's 0 is the function's None: all


def _pixels() -> dict:
    from stages.extract.pixels import write_pixel_store

    return _keywords(write_pixel_store)


# command: (its settings' defaults, {option: setting} where the names differ, the command line's own options)
SETTINGS = {
    "extract": (_extract, {"blocks_spec": "blocks"}, {"model", "data", "out", "nproc", "dry_run"}),
    "probe": (_probe, {}, {"store", "head", "render", "group_size"}),
    "sweep": (_probe, {}, {"stores", "heads", "dry_run", "group_size"}),
    "cka": (_cka, {}, {"stores", "out"}),
    "similarity": (_similarity, {}, {"stores", "out"}),
    "pretrain": (_pretrain, {}, {"data_dir", "out", "overwrite"}),
    "random-init": (_random_init, {}, {"model", "out"}),
    "data": (_data, {}, {"out"}),
    "pixels": (_pixels, {}, {"data", "out", "model", "size", "channels"}),
    "verify": (dict, {}, {"store", "storage_options", "repair"}),
    "report": (dict, {}, {"results", "out", "transfer"}),
    "convert-adm": (dict, {}, {"checkpoint", "out_dir", "flags", "preset"}),
    "blocks": (dict, {}, {"model"}),
    "datasets": (dict, {}, set()),
}
# Help that states a default the settings leave to the stage or the data (a None resolved at run time).
RESOLVED_LATER = {
    "timesteps",
    "pools",
    "splits",
    "workers",
    "chunk_samples",
    "shard_samples",
    "preprocess",
    "prompt",
    "augment",
    "val_split",
    "test_split",
    "name",
    "lrs",
    "weight_decays",
    "memory_budget",
    "threads",
    "views",
    "samples",
    "blocks",
    "stores",
    "size",
    "channels",
    "scale",
    "epochs",
    "recipe",
    "feature_norm",
    "guidance",
    "offload",
    "episodes",
    "image_column",
    "label_column",
}
# Options with no default of their own: flags of the command and required values.
FLAGS_AND_REQUIRED = {"help"}


def _default(param: click.Parameter):
    """The option's default as the command receives it; None when it has none (click marks that with a
    sentinel of its own)."""
    value = param.default
    if not isinstance(value, (str, int, float, tuple, list)) or value == ():
        return None
    return param.type_cast_value(click.Context(main), value)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and float(a) == pytest.approx(float(b))
    return a == b


def test_every_command_is_covered():
    assert set(SETTINGS) == set(main.commands)


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_click_defaults_equal_the_settings(command):
    defaults_of, renamed, own = SETTINGS[command]
    defaults = defaults_of()
    unaccounted, wrong = [], []
    for param in main.commands[command].params:
        name = renamed.get(param.name, param.name)
        if param.name in own or param.name in FLAGS_AND_REQUIRED:
            continue
        if name not in defaults:
            unaccounted.append(param.name)
            continue
        value = _default(param)
        if value is not None and not _same(value, defaults[name]):
            if not (getattr(param, "is_flag", False) and not param.default and defaults[name] in (False, None)):
                wrong.append((param.name, value, defaults[name]))
    assert unaccounted == [], f"options of `pipeline {command}` with no counterpart in its settings"
    assert wrong == [], f"`pipeline {command}`: click default differs from the settings' default"


_BRACKET = re.compile(r"\[default: ([^\]]*)\]")


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_help_defaults_show_the_settings(command):
    defaults_of, renamed, own = SETTINGS[command]
    defaults = defaults_of()
    ctx = click.Context(
        main.commands[command], info_name=command, parent=click.Context(main, info_name="pipeline"), show_default=True
    )
    wrong = []
    for param in main.commands[command].params:
        if not isinstance(param, click.Option):
            continue
        help_text = " ".join(param.get_help_record(ctx)[1].split())
        assert "{" not in help_text or "{}" in help_text, (param.name, help_text)  # every placeholder filled in
        name = renamed.get(param.name, param.name)
        for shown in _BRACKET.findall(" ".join((param.help or "").split())):
            if param.name in own or name in RESOLVED_LATER or name not in defaults:
                continue
            expected = options.shown(defaults[name])
            if not re.match(rf"{re.escape(expected)}\b", shown):
                wrong.append((param.name, shown, expected))
    assert wrong == [], f"`pipeline {command} --help` shows defaults other than the settings'"


def test_probe_epochs_help_names_every_torch_heads_rule():
    from stages.probe.registry import HEADS

    record = next(p for p in main.commands["probe"].params if p.name == "epochs")
    text = " ".join(record.get_help_record(click.Context(main.commands["probe"]))[1].split())
    for spec in HEADS.values():
        if spec.epochs is not None:
            assert re.search(
                rf"{spec.epochs} for [^;]*\b{re.escape(spec.name)}\b[^;]*at least {spec.min_steps} steps", text
            ), (spec.name, text)

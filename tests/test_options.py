"""The command line's value syntaxes (`pipeline/options.py`): one parser per syntax, tested by table, and
the options that use them, through click's runner."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.options import merge_storage_options, parse_int_list, parse_named, parse_scoped, parse_storage_option


@pytest.mark.parametrize(
    "text, expected",
    [
        ("anon=true", (("anon",), True)),
        ("retries=3", (("retries",), 3)),
        ("client_kwargs.region_name=eu-west-1", (("client_kwargs", "region_name"), "eu-west-1")),
        ("endpoint_url=http://127.0.0.1:9000/a=b", (("endpoint_url",), "http://127.0.0.1:9000/a=b")),
        ("token=", (("token",), "")),
    ],
)
def test_parse_storage_option(text, expected):
    assert parse_storage_option(text) == expected


@pytest.mark.parametrize("text", ["anon", "=true", "a..b=1", ".a=1"])
def test_parse_storage_option_rejects(text):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_storage_option(text)


def test_storage_options_nest_and_refuse_a_key_given_twice():
    pairs = [parse_storage_option(t) for t in ("anon=false", "client_kwargs.region_name=x", "client_kwargs.verify=0")]
    assert merge_storage_options(pairs) == {"anon": False, "client_kwargs": {"region_name": "x", "verify": 0}}
    for texts in (("anon=true", "anon=false"), ("a=1", "a.b=2"), ("a.b=2", "a=1")):
        with pytest.raises(ValueError):
            merge_storage_options([parse_storage_option(t) for t in texts])


@pytest.mark.parametrize(
    "text, suffix, expected",
    [
        ("results/", "", ("results", "results/")),
        ("pixels=runs/raw", "", ("pixels", "runs/raw")),
        (" pre = results/a ", "", ("pre", "results/a")),
        ("features/adm256.zarr", ".zarr", ("adm256", "features/adm256.zarr")),
        ("features/adm256.zarr/", ".zarr", ("adm256", "features/adm256.zarr/")),
        ("pre=features/a.zarr", ".zarr", ("pre", "features/a.zarr")),
        ("s3://bucket/run=3/f.zarr", ".zarr", ("f", "s3://bucket/run=3/f.zarr")),
        ("C:\\data\\f.zarr", ".zarr", ("f", "C:\\data\\f.zarr")),
        ("x/.zarr/", ".zarr", None),  # a hidden name: refused
    ],
)
def test_parse_named(text, suffix, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse_named(text, suffix=suffix)
    else:
        assert parse_named(text, suffix=suffix) == expected


@pytest.mark.parametrize("text", ["", "=a/b", "name=", "results/.sweep", "."])
def test_parse_named_rejects(text):
    with pytest.raises(ValueError):
        parse_named(text)


@pytest.mark.parametrize(
    "text, expected", [("18-30", (None, "18-30")), ("adm=1,2", ("adm", "1,2")), (" r50 =all", ("r50", "all"))]
)
def test_parse_scoped(text, expected):
    assert parse_scoped(text, str) == expected


@pytest.mark.parametrize(
    "text, minimum, distinct, expected",
    [
        ("10,90,150", None, True, (10, 90, 150)),
        ("0", 0, True, (0,)),
        ("32,64,64", 1, False, (32, 64, 64)),
        ("32,64,64", 1, True, "more than once"),
        ("1,x", None, True, "comma list of integers"),
        ("", None, True, "empty"),
        ("-1,2", 0, True, "at least 0"),
    ],
)
def test_parse_int_list(text, minimum, distinct, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            parse_int_list(text, minimum=minimum, distinct=distinct)
    else:
        assert parse_int_list(text, minimum=minimum, distinct=distinct) == expected


# -- the options, through the command line ------------------------------------------------------------
@pytest.mark.parametrize("command", ["extract", "verify", "probe", "sweep", "cka"])
def test_every_storage_option_is_one_syntax(command, tmp_path):
    """Bad KEY=VALUE syntax is a usage error (exit 2) before any work, the same for every command."""
    base = {
        "extract": ["--model", "m", "--data", "d", "--out", "memory://x/s.zarr"],
        "verify": ["--store", "s"],
        "probe": ["--store", "s", "--head", "linear"],
        "sweep": ["--store", "s", "--head", "linear"],
        "cka": ["--store", "s", "--out", str(tmp_path / "o")],
    }[command]
    for bad, fragment in ((["anon"], "expected KEY=VALUE"), (["a=1", "a=2"], "is given twice")):
        extra = [arg for value in bad for arg in ("--storage-option", value)]
        result = CliRunner().invoke(main, [command, *base, *extra])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output


def test_storage_options_reach_the_store_as_one_dict(tmp_path):
    result = CliRunner().invoke(
        main, ["verify", "--store", str(tmp_path / "local.zarr"), "--storage-option", "anon=true"]
    )
    assert result.exit_code == 1 and "storage options apply to object stores" in result.output


@pytest.mark.parametrize("command", ["probe", "sweep"])
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--workers", "0"),
        ("--workers", "-2"),
        ("--scale", "0"),
        ("--threads-per-worker", "0"),
        ("--connect-timeout", "0"),
    ],
)
def test_engine_counts_are_range_checked_like_nproc(command, flag, value):
    result = CliRunner().invoke(main, [command, "--store", "s", "--head", "linear", flag, value])
    assert result.exit_code == 2, result.output
    assert "Invalid value for" in result.output and flag in result.output


def test_sweep_names_its_stores_with_the_shared_parser():
    stores = next(p for p in main.commands["sweep"].params if p.name == "stores")
    assert stores.type.convert("s3://bucket/run=3/f.zarr", stores, None) == ("f", "s3://bucket/run=3/f.zarr")
    assert stores.type.convert("pre=features/a.zarr", stores, None) == ("pre", "features/a.zarr")

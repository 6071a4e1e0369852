"""The store's format as written down: the documentation names every key, the manifest refuses damaged
settings by name, `cache` speaks no command-line language, and the advice of a repairable error is the
one repair command (run verbatim in tests/test_faults.py)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from cache import FeatureStore, FeatureStoreWriter, errors, layout
from cache.errors import IntegrityError
from cache.manifest import COPY, Manifest, read_copy, upgrade
from cache.storage import Location
from pipeline.advice import render, repair_command
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "store-format.md").read_text()


@pytest.fixture(scope="module")
def store(tiny_model, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("format") / "s.zarr"
    run_extract(
        ExtractConfig(
            model=str(tiny_model),
            data=str(tiny_data),
            out=str(out),
            blocks=(3,),
            timesteps=(10,),
            pools=(1,),
            batch_size=4,
            chunk_samples=4,
            shard_samples=8,
        ),
        progress=False,
    )
    return out


def test_the_documentation_names_every_root_attribute_and_every_kind_of_key(store):
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    assert attrs["format"] == layout.FORMAT and layout.FORMAT in DOC
    assert [key for key in attrs if f"`{key}`" not in DOC] == []
    keys = {p.relative_to(store).as_posix() for p in store.rglob("zarr.json")}
    kinds = {
        re.sub(
            r"block\d+/t\d+",
            "block<B>/t<T>",
            re.sub(r"set-[0-9a-f]+", "<set>", re.sub(r"^(_progress/|_digests/)?(train|val)", r"\1<split>", k)),
        )[: -len("/zarr.json")]
        for k in keys - {"zarr.json"}
    }
    documented = {k for k in kinds if f"`{k}`" in DOC}
    groups = {"<split>", "_progress", "_digests", "_progress/<split>", "_digests/<split>", "<split>/block3"}
    assert kinds - documented - groups == set()


def settings(**changes) -> dict:
    attrs = {
        "format": layout.FORMAT,
        "kind": "unet",
        "model": {},
        "data": {},
        "preprocessing": {},
        "noise_seed": 0,
        "dtype": "float16",
        "precision": "fp32",
        "chunk_samples": 4,
        "shard_samples": 8,
        "block_table": [{"number": 3, "channels": 8, "resolution": 4, "module": "down_blocks.1"}],
        "splits": {"train": 10},
        "features": {"3": {"grid": 2, "timesteps": [10, 90]}},
        "pools": [1, 2],
    }
    return {**attrs, **changes}


def test_the_manifest_types_the_settings():
    manifest = Manifest.parse(settings())
    assert manifest.block(3).channels == 8 and manifest.block(3).row["module"] == "down_blocks.1"
    assert manifest.arrays() == [(3, 10), (3, 90)] and manifest.shape("train", 3) == (10, 8, 2, 2)
    assert manifest.num_shards("train") == 2 and manifest.chunks_per_shard == 2
    assert pickle.loads(pickle.dumps(manifest)) == manifest  # stores travel to dask workers


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"chunk_samples": 0}, "chunk_samples is 0"),
        ({"shard_samples": 6}, "shard_samples 6 is not a multiple of chunk_samples 4"),
        ({"block_table": [{"number": 3, "channels": "8", "resolution": 4}]}, "block 3 channels is '8'"),
        ({"splits": {"train": -1}}, "splits is"),
        ({"features": {"7": {"grid": 2, "timesteps": [10]}}}, "lists block '7', which the block table has not"),
        ({"features": {"3": {"grid": 2, "timesteps": "10"}}}, "features.3.timesteps is '10'"),
        ({"pools": [0]}, "pools is [0]"),
        ({"features": None}, "features is"),
    ],
)
def test_damaged_settings_are_named_by_key(changes, named):
    with pytest.raises(IntegrityError, match=re.escape(named)) as error:
        Manifest.parse(settings(**changes), "s.zarr")
    assert error.value.remedy == errors.REPLACE and "--overwrite" in render(error.value)


def test_the_writer_stores_the_manifest_it_built_and_reading_gives_it_back(store):
    stored = json.loads((store / "zarr.json").read_text())["attributes"]
    written = FeatureStoreWriter.attach(store).manifest
    assert stored == written.to_attrs()  # the writer's typed manifest is what is on disk, key for key
    assert FeatureStore.open(store).manifest == written == Manifest.parse(written.to_attrs())
    assert list(stored) == list(written.to_attrs())  # in the manifest's one order
    assert written.info["model_source"] and written.recipe["blocks"] == [3]  # descriptive settings kept too
    assert json.loads((store / COPY).read_text())["attributes"]["manifest"] == stored
    assert read_copy(Location.parse(store)) == written


def test_no_dict_of_the_stores_schema_is_written_outside_the_manifest():
    keys = "|".join(("format", "block_table", "splits", "features", "pools", "index_digests", "recipe"))
    pattern = re.compile(rf"[\"']({keys})[\"']\s*:")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((REPO / "cache").glob("*.py"))
        if path.name != "manifest.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


def test_earlier_layouts_are_upgraded_in_one_place():
    before_sharding = settings(format="diffusion-feature-cache/1")
    del before_sharding["shard_samples"]
    upgraded = upgrade(before_sharding)
    assert upgraded["shard_samples"] == 4 and upgraded["index_digests"] == {} and upgraded["recipe"] is None
    assert Manifest.parse(before_sharding).shard_samples == 4


def test_cache_speaks_no_command_line_language():
    """Errors in `cache` carry typed fields; `pipeline.advice` turns them into commands and flags."""
    found = []
    for path in sorted((REPO / "cache").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.name == "extras.py" and "--constraint" in line:  # pip's flag, in the pip command it prints
                continue
            if re.search(r"`pipeline |(?<![\w-])--[a-z]", line):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


def test_the_repair_command_names_the_store_and_its_options_but_no_secret():
    options = {"client_kwargs": {"region_name": "eu-west-1"}, "key": "AKIA", "secret": "x"}
    location = Location("s3://lab/a b.zarr", options)
    command = repair_command(location)
    assert command == (
        "pipeline verify --store 's3://lab/a b.zarr' --storage-option client_kwargs.region_name=eu-west-1 --repair"
    )
    message = render(IntegrityError("damaged", store=location))
    assert message.endswith(f"`{command}`")

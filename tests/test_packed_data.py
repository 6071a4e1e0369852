"""WebDataset shards (wds:) and Hugging Face data sets (hf:) as inputs: the same images as an image folder
give the same store (labels, keys, features); ranks and a killed run give the store one process gives;
a changed tar is noticed; bad shards and tables are one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from packed_fixtures import add_member, save_to_disk, write_parquet, write_shards

from cache import FeatureStore, StoreError
from cache.errors import DataChangedError
from pipeline.cli import main
from stages.data.errors import DataError
from stages.data.registry import open_dataset
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract

from helpers import assert_same, decoded, finish, launch, make_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("packed") / "images", counts={"train": 21, "val": 6}, seed=3)


@pytest.fixture(scope="module")
def shards(folder) -> Path:
    root = folder.parent / "wds"
    write_shards(folder, root, per_shard=5)
    return root


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """`datasets` converts parquet into its cache: a temporary one, not the user's."""
    import datasets

    before = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf-cache")
    yield
    datasets.config.HF_DATASETS_CACHE = before


@pytest.fixture(scope="module")
def parquet(folder) -> Path:
    return write_parquet(folder, folder.parent / "parquet")


def settings(model, data, out, **changes) -> ExtractConfig:
    base = {
        "model": str(model),
        "data": str(data),
        "out": str(out),
        "blocks": (2, 5),
        "timesteps": (10, 90),
        "pools": (1, 2),
        "batch_size": 4,
        "chunk_samples": 4,
        "shard_samples": 8,
    }
    return ExtractConfig(**{**base, **changes})


def stems(split) -> list[str]:
    return [Path(p).stem for p in split.paths]


# -- listings -------------------------------------------------------------------------------------------------
def test_wds_listing_is_the_folders_keys_labels_and_classes(folder, shards):
    images = open_dataset(str(folder))
    packed = open_dataset(f"wds:{shards}")
    assert list(packed) == ["train", "val"]
    for name in images:
        assert packed[name].paths == stems(images[name])
        np.testing.assert_array_equal(packed[name].labels, images[name].labels)
        assert packed[name].classes == images[name].classes
        for row in (0, len(images[name].paths) - 1):
            x, (digest, _) = packed[name].read(row, 16, 3)
            y, (expected, _) = images[name].read(row, 16, 3)
            assert digest == expected
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_wds_order_keys_and_labels_are_those_webdataset_reads(shards):
    webdataset = pytest.importorskip("webdataset")
    patterns = {
        "train": str(shards / "set-train-{000000..000004}.tar"),
        "val": str(shards / "set-val-{000000..000001}.tar"),
    }
    spec = "wds:" + ",".join(f"{split}={pattern}" for split, pattern in patterns.items())
    packed = open_dataset(spec)
    for split, pattern in patterns.items():
        reference = [
            (sample["__key__"], int(sample["cls"]))
            for sample in webdataset.WebDataset(pattern, shardshuffle=False, empty_check=False)
        ]
        assert list(zip(packed[split].paths, packed[split].labels.tolist())) == reference


def test_wds_labels_from_a_json_field_and_class_names_without_a_side_file(folder, tmp_path):
    write_shards(folder, tmp_path / "wds", per_shard=7, label="json", class_file=False)
    packed = open_dataset(f"wds:{tmp_path / 'wds'}", label_column="label", splits=("train",))
    images = open_dataset(str(folder))
    np.testing.assert_array_equal(packed["train"].labels, images["train"].labels)
    assert packed["train"].classes == ["0", "1", "2"]
    assert packed["train"].meta["label"] == "json:label"


def test_hf_parquet_and_save_to_disk_are_the_folders_rows(folder, parquet, tmp_path):
    images = open_dataset(str(folder))
    disk = save_to_disk(parquet, tmp_path / "disk")
    for spec in (f"hf:{parquet}", f"hf:{disk}"):
        packed = open_dataset(spec)
        assert list(packed) == ["train", "val"]
        for name in images:
            assert packed[name].paths == [f"{name}/{row}" for row in range(len(images[name].paths))]
            np.testing.assert_array_equal(packed[name].labels, images[name].labels)
            assert packed[name].classes == images[name].classes
            x, (digest, _) = packed[name].read(2, 16, 3)
            y, (expected, _) = images[name].read(2, 16, 3)
            assert digest == expected
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_classes_and_subset_select_rows_of_packed_data(shards, tmp_path):
    (tmp_path / "classes.txt").write_text("class2\nclass0\n")
    packed = open_dataset(f"wds:{shards}", classes=str(tmp_path / "classes.txt"))
    assert packed["train"].classes == ["class0", "class2"]
    assert set(packed["train"].labels.tolist()) == {0, 1}
    assert packed["train"].meta["class_list"]["classes"] == 2
    keys = packed["train"].paths
    x, _ = packed["train"].read(len(keys) - 1, 16, 3)
    whole = open_dataset(f"wds:{shards}")
    y, _ = whole["train"].read(whole["train"].paths.index(keys[-1]), 16, 3)
    torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- extraction -----------------------------------------------------------------------------------------------
def test_extraction_from_shards_and_tables_equals_the_folders(tiny_model, folder, shards, parquet, tmp_path):
    run_extract(settings(tiny_model, folder, tmp_path / "folder.zarr"), progress=False)
    reference = FeatureStore.open(tmp_path / "folder.zarr")

    def rows(split):
        return [f"{split}/{row}" for row in range(len(reference.labels(split)))]

    for spec, paths in (
        (f"wds:{shards}", lambda split: stems(open_dataset(str(folder))[split])),
        (f"hf:{parquet}", rows),
    ):
        out = tmp_path / f"{spec[:2]}.zarr"
        run_extract(settings(tiny_model, spec, out), progress=False)
        store = FeatureStore.open(out)
        assert store.splits == reference.splits
        for split in reference.splits:
            np.testing.assert_array_equal(store.labels(split), reference.labels(split))
            assert list(store.paths(split)) == paths(split)
            np.testing.assert_array_equal(store.file_records(split)[:, 0], reference.file_records(split)[:, 0])
            for block, timestep in reference.arrays():
                for pool in (1, 2):
                    np.testing.assert_array_equal(
                        store.read(split, block, timestep, pool=pool), reference.read(split, block, timestep, pool=pool)
                    )


@pytest.mark.slow
def test_ranks_write_the_store_one_process_writes_from_shards(tiny_model, shards, tmp_path):
    spec = f"wds:{shards}"
    ((code, _, err),) = finish(launch(tiny_model, spec, tmp_path / "one.zarr", 1, tmp_path / "one"))
    assert code == 0, err[-3000:]
    results = finish(launch(tiny_model, spec, tmp_path / "two.zarr", 2, tmp_path / "two"))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert_same(decoded(tmp_path / "two.zarr"), decoded(tmp_path / "one.zarr"))


@pytest.mark.slow
def test_a_killed_run_resumes_reading_only_the_unfinished_samples(tiny_model, shards, tmp_path, monkeypatch):
    from stages.data.wds import TarSource

    spec = f"wds:{shards}"
    reference = tmp_path / "reference.zarr"
    run_extract(settings(tiny_model, spec, reference, batch_size=1), progress=False)
    killed = tmp_path / "killed.zarr"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        "--model",
        str(tiny_model),
        "--data",
        spec,
        "--out",
        str(killed),
        "--blocks",
        "2,5",
        "--timesteps",
        "10,90",
        "--pool",
        "1,2",
        "--batch-size",
        "1",
        "--chunk-samples",
        "4",
        "--shard-samples",
        "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120

    def done():
        try:
            return int(FeatureStore.open(killed).done_chunks("train", 5, 90).sum())
        except (OSError, KeyError, ValueError, StoreError):  # not created yet, or being written
            return 0

    try:
        while done() < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert process.poll() is None, "the extraction finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    before = FeatureStore.open(killed)
    missing = before.missing()
    assert missing, "the kill came too late to test anything"
    unfinished = set()
    for (split, _, _), chunks in missing.items():
        n = len(before.labels(split))
        for chunk in chunks:
            unfinished |= {(split, row) for row in range(chunk * 4, min(chunk * 4 + 4, n))}
    fetched = []
    original = TarSource.fetch

    def fetch(self, index):
        fetched.append(self.where(index))
        return original(self, index)

    monkeypatch.setattr(TarSource, "fetch", fetch)
    headers = _count_header_reads(monkeypatch)
    run_extract(settings(tiny_model, spec, killed, batch_size=1, workers=0), progress=False)
    assert headers == []  # the listing came from the index saved by the first run: no shard opened for it
    listing = open_dataset(spec)
    expected = sorted(listing[split].source.where(row) for split, row in unfinished)
    assert sorted(fetched) == expected  # each unfinished sample once, no finished one
    assert_same(decoded(killed), decoded(reference))


def _count_header_reads(monkeypatch) -> list[str]:
    """The names of the shards whose headers are read from now on (each time one is indexed)."""
    from stages.data import wds

    read, original = [], wds.tar_members

    def counting(file, total, where, small=frozenset()):
        read.append(Path(where).name)
        return original(file, total, where, small)

    monkeypatch.setattr(wds, "tar_members", counting)
    return read


def test_a_shards_index_is_saved_at_its_first_listing_and_read_until_it_changes(folder, tmp_path, monkeypatch):
    from stages.data.wds import open_wds

    files = write_shards(folder, tmp_path / "wds", per_shard=5)
    names = sorted(f.name for shards in files.values() for f in shards)
    monkeypatch.setenv("WDS_INDEX_CACHE", str(tmp_path / "index"))
    read = _count_header_reads(monkeypatch)

    def listing():
        read.clear()
        opened = open_wds(str(tmp_path / "wds"), progress=False)
        return {
            s: (
                split.paths,
                split.labels.tolist(),
                split.source.shard.tolist(),
                split.source.offset.tolist(),
                split.source.size.tolist(),
                split.source.names,
                split.identity_lines,
            )
            for s, split in opened.items()
        }

    first = listing()
    assert sorted(read) == names
    assert listing() == first and read == []  # every shard's index read back: not one shard opened
    shard = files["train"][1]
    os.utime(shard, ns=(time.time_ns(), shard.stat().st_mtime_ns + 10**9))  # another time: indexed again
    assert listing() == first and read == [shard.name]
    for saved in (tmp_path / "index").rglob("*.json"):
        saved.write_text('{"samples": [')  # damaged: indexed again, and saved whole
    assert listing() == first and sorted(read) == names
    assert listing() == first and read == []
    monkeypatch.setenv("WDS_INDEX_CACHE", "off")
    assert listing() == first and sorted(read) == names


def test_a_changed_tar_is_refused_and_a_touched_one_is_not(tiny_model, folder, tmp_path):
    root = tmp_path / "wds"
    files = write_shards(folder, root, per_shard=5)
    out = tmp_path / "store.zarr"
    run_extract(settings(tiny_model, f"wds:{root}", out, blocks=(2,), timesteps=(10,)), progress=False)
    shard = files["train"][1]
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: the same bytes, a new mtime
    run_extract(settings(tiny_model, f"wds:{root}", out, blocks=(2,), timesteps=(10,)), progress=False)
    member = open_dataset(f"wds:{root}")["train"].source
    row = next(i for i in range(len(member.shard)) if member.shard[i] == 1)
    with open(shard, "r+b") as file:  # another image of the same size: the identity cannot see it
        file.seek(int(member.offset[row]) + int(member.size[row]) - 8)
        file.write(b"\x00" * 8)
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with pytest.raises(DataChangedError, match="changed since the store's features were computed"):
        run_extract(settings(tiny_model, f"wds:{root}", out, blocks=(2,), timesteps=(10,)), progress=False)


# -- bad input: one line each ----------------------------------------------------------------------------------
def truncated_member(folder, tmp):
    files = write_shards(folder, tmp / "wds", per_shard=5)
    data = files["train"][2].read_bytes()
    files["train"][2].write_bytes(data[:1500])  # inside the first image
    return f"wds:{tmp / 'wds'}", "is truncated"


def missing_cls(folder, tmp):
    files = write_shards(folder, tmp / "wds", per_shard=5)

    with tarfile.open(files["val"][0], "w", format=tarfile.USTAR_FORMAT) as tar:
        add_member(tar, "lonely.png", (folder / open_dataset(str(folder))["val"].paths[0]).read_bytes())
    return f"wds:{tmp / 'wds'}", "has no .cls member"


def parquet_without_labels(folder, tmp):
    return f"hf:{write_parquet(folder, tmp / 'parquet', label=False)}", "name the label column with --label-column"


def hub_id_offline(folder, tmp, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return "hf:someone/no-such-set", "could not load it from the Hugging Face Hub"


def not_a_pattern(folder, tmp):
    return f"wds:train={tmp}/none-{{0..3}}.tar", "no such shard"


@pytest.mark.parametrize("case", [truncated_member, missing_cls, parquet_without_labels, hub_id_offline, not_a_pattern])
def test_bad_packed_data_is_a_one_line_error(case, tiny_model, folder, tmp_path, monkeypatch):
    arguments = (folder, tmp_path, monkeypatch) if case is hub_id_offline else (folder, tmp_path)
    data, fragment = case(*arguments)
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_model),
            "--data",
            data,
            "--out",
            str(tmp_path / "store.zarr"),
            "--blocks",
            "2",
            "--timesteps",
            "10",
        ],
    )
    assert result.exit_code == 1, result.output
    # above it, only the progress `datasets` shows while it converts parquet
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    message = errors[0]
    assert fragment in message
    assert "Traceback" not in message
    assert not (tmp_path / "store.zarr").exists()


def test_a_split_the_data_lacks_names_the_splits_it_has(shards, parquet):
    with pytest.raises(DataError, match="its splits are train, val"):
        open_dataset(f"wds:{shards}", splits=("test",))
    with pytest.raises(DataError, match="its splits are train, val"):
        open_dataset(f"hf:{parquet}", splits=("test",))


@pytest.mark.slow  # a subprocess per case, with the extra made unimportable
@pytest.mark.parametrize(
    ("blocked", "extra", "data"),
    [
        (["braceexpand"], "wds", "wds:train={shards}/set-train-{{000000..000004}}.tar"),  # a folder needs no expansion
        (["datasets"], "hf", "hf:{parquet}"),
    ],
)
def test_packed_data_without_its_extra_names_the_install_command(
    blocked, extra, data, shards, parquet, tiny_model, tmp_path
):
    from helpers import run_without

    done = run_without(
        blocked,
        "extract",
        "--model",
        str(tiny_model),
        "--data",
        data.format(shards=shards, parquet=parquet),
        "--out",
        str(tmp_path / "store.zarr"),
        "--dry-run",
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"[{extra}]" in last and f"pip install 'diffusion-feature-cache[{extra}]'" in last, done.stderr
    assert "Traceback" not in done.stderr


def test_the_command_line_names_columns_and_lists_the_packed_kinds(tiny_model, folder, parquet, tmp_path):
    write_shards(folder, tmp_path / "wds", per_shard=8, label="json")
    runner = CliRunner()
    for data, extra in (
        (f"wds:{tmp_path / 'wds'}", ["--image-column", "png", "--label-column", "label"]),
        (f"hf:{parquet}", ["--image-column", "image", "--label-column", "label"]),
    ):
        result = runner.invoke(
            main,
            [
                "extract",
                "--model",
                str(tiny_model),
                "--data",
                data,
                "--out",
                str(tmp_path / "store.zarr"),
                "--blocks",
                "2",
                "--dry-run",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        assert "21" in result.output  # the train split's samples
    result = runner.invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_model),
            "--data",
            f"hf:{parquet}",
            "--out",
            str(tmp_path / "store.zarr"),
            "--blocks",
            "2",
            "--dry-run",
            "--label-column",
            "no",
        ],
    )
    assert result.exit_code == 1 and "has no column 'no' (--label-column)" in result.output
    listed = runner.invoke(main, ["datasets"])
    assert listed.exit_code == 0 and "wds:PATTERN" in listed.output and "hf:FOLDER" in listed.output


@pytest.mark.parametrize("form", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_index_finds_what_tarfile_finds(form, tmp_path):
    from stages.data.tarindex import tar_members

    path = tmp_path / "shard.tar"
    long = "d" * 70 + "/" + "k" * 60  # over ustar's 100-byte name field unless split into its prefix
    names = [
        "a.jpg",
        "a.cls",
        f"{long}.png",
        f"{long}.cls",
        "x" * 120 + ".jpg" if form != tarfile.USTAR_FORMAT else "y.jpg",
        "ü-ß.jpg",
    ]
    with tarfile.open(path, "w", format=form) as tar:
        tar.addfile(tarfile.TarInfo("folder"))  # a member that is not a file: not indexed
        for i, name in enumerate(names):
            add_member(tar, name, bytes(range(256)) * (i + 1))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    with open(path, "rb") as file:
        members, small = tar_members(file, path.stat().st_size, str(path), {"cls"})
    assert [(m.name, m.offset, m.size) for m in members] == expected
    assert small == {"a.cls": bytes(range(256)) * 2, f"{long}.cls": bytes(range(256)) * 4}

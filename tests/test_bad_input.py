"""Bad input to every command: a one-line error that names the problem and the fix, a non-zero exit, no
traceback, and nothing already there changed. Each case is one row: how to set it up, the exit code,
a fragment of the message."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cache import layout
from pipeline.cli import main

import fake_archives as fa
from helpers import digest, digits_features, make_image_folder, write_store

SHARED = Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Env:
    tmp: Path
    model: Path
    data: Path
    store: Path

    def extract(self, *extra, data=None, model=None, out=None):
        return [
            "extract",
            "--model",
            model or self.model,
            "--data",
            data or self.data,
            "--out",
            out or self.tmp / "new.zarr",
            "--blocks",
            "3",
            "--timesteps",
            "10",
            *extra,
        ]


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory) -> Path:
    features, labels = digits_features(n_train=300)
    return write_store(tmp_path_factory.mktemp("bad") / "store.zarr", features, labels, pools=(1,))


@pytest.fixture
def env(tmp_path, tiny_model, tiny_data, probe_store) -> Env:
    return Env(tmp_path, tiny_model, tiny_data, probe_store)


# -- set-ups: each returns (command-line arguments, paths that must stay as they were) -----------------
def a_file(env):
    (env.tmp / "file").write_text("not a store")
    return env.extract(out=env.tmp / "file"), [env.tmp / "file"]


def under_a_file(env):
    (env.tmp / "file").write_text("not a store")
    return env.extract(out=env.tmp / "file" / "s.zarr"), [env.tmp / "file"]


def a_foreign_directory(env):
    (env.tmp / "mine").mkdir()
    (env.tmp / "mine" / "notes.txt").write_text("keep me")
    return env.extract(out=env.tmp / "mine"), [env.tmp / "mine"]


def broken_model(part):
    def setup(env):
        model = env.tmp / "model"
        shutil.copytree(env.model, model)
        if part == "config":
            (model / "config.json").write_text('{"sample_size": 16,')
        else:
            for weights in model.glob("*.safetensors"):
                weights.unlink()
        return env.extract(model=model), [model]

    return setup


def symlink_loop(env):
    data = make_image_folder(env.tmp / "d", counts={"train": 4, "val": 2}, classes=2)
    (data / "train" / "loop").symlink_to(data / "train", target_is_directory=True)
    return env.extract(data=data), [data / "train" / "class0"]


def fake_image_with_workers(env):
    data = make_image_folder(env.tmp / "d", counts={"train": 6, "val": 2}, classes=2)
    (data / "train" / "class1" / "img0003.png").write_bytes(b"not a png")
    return env.extract("--workers", "2", data=data), []


def a_bad_png(kind):
    def setup(env):
        data = make_image_folder(env.tmp / "d", counts={"train": 6, "val": 2}, classes=2)
        png = data / "train" / "class1" / "img0003.png"
        png.write_bytes({"empty": b"", "truncated": png.read_bytes()[:60], "fake": b"not a png at all"}[kind])
        return env.extract(data=data), [data]

    return setup


def a_garbage_mat(name, content):
    def setup(env):
        root, _ = fa.make_flowers(env.tmp / "flowers")
        (root / name).write_bytes(content)
        return env.extract(data=f"flowers:{root}"), [root]

    return setup


def truncated_image_in_pretrain(env):
    data = make_image_folder(env.tmp / "d", counts={"train": 6, "val": 2}, classes=2, size=(8, 8))
    png = data / "train" / "class0" / "img0002.png"
    png.write_bytes(png.read_bytes()[:40])
    return ["pretrain", "--data", data, "--out", env.tmp / "m", "--epochs", "1", "--image-size", "8"], []


def model_like(env, name, log):
    out = env.tmp / name
    out.mkdir()
    for file in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"):
        shutil.copy(env.model / file, out / file)
    (out / log[0]).write_text(json.dumps(log[1]))
    return out


def pretrain_into(kind):
    def setup(env):
        if kind == "another model":
            out = model_like(env, "other", ("random_init.json", {"seed": 0}))
        else:
            out = model_like(env, "mine", ("train_log.json", {"init_weights_sha256": "0" * 64}))
        return ["pretrain", "--data", env.data, "--out", out, "--epochs", "1", "--image-size", "8"], [out]

    return setup


def random_init_into_a_trained_model(env):
    out = model_like(env, "trained", ("train_log.json", {"init_weights_sha256": "0" * 64}))
    return ["random-init", "--model", env.model, "--out", out], [out]


def run_dir(env):
    result = CliRunner().invoke(
        main, ["probe", "--store", env.store, "--head", "ridge", "--out", env.tmp / "r", "--no-render"]
    )
    assert result.exit_code == 0, result.output
    return env.tmp / "r" / "ridge"


def report_into_a_probe_run(env):
    run = run_dir(env)
    return ["report", "--results", run, "--out", run], [run]


def report_into_a_users_summary(env):
    run = run_dir(env)
    (env.tmp / "notes").mkdir()
    (env.tmp / "notes" / "summary.md").write_text("# My notes\n")
    return ["report", "--results", run, "--out", env.tmp / "notes"], [env.tmp / "notes"]


def report_on(damage):
    def setup(env):
        run = run_dir(env)
        csv = run / "configs.csv"
        csv.write_text("" if damage == "empty" else csv.read_text()[:150])
        return ["report", "--results", run, "--out", env.tmp / "rep"], [run]

    return setup


def convert_a_text_file(env):
    (env.tmp / "notes.txt").write_text("hello")
    flags = (SHARED / "fixtures" / "adm_tiny" / "flags.txt").read_text().strip()
    return ["convert-adm", env.tmp / "notes.txt", env.tmp / "o", "--flags", flags], []


def verify_a_damaged_store(env):
    store = env.tmp / "s.zarr"
    shutil.copytree(env.store, store)
    chunk = store / layout.shard_file("train/block1/t10", 0, ndim=4)
    chunk.write_bytes(chunk.read_bytes()[:-3])
    return ["verify", "--store", store], [store]


def torchrun_and_nproc(env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    return env.extract("--nproc", "2"), []


def bomb(env, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the tiny images are 480 pixels: over twice the cap
    return env.extract(), []


def a_cub_without(name):
    def setup(env):
        root, _ = fa.make_cub(env.tmp / "download")
        (root / name).unlink()
        return env.extract(data=f"cub:{root}"), [env.tmp / "download"]

    return setup


def a_class_list_naming_no_class(env):
    (env.tmp / "classes.txt").write_text("class0\nclass9\n")
    return env.extract("--classes", env.tmp / "classes.txt"), [env.tmp / "classes.txt"]


def another_class_list_for_a_store(env):
    store = env.tmp / "made.zarr"
    result = CliRunner().invoke(main, [str(a) for a in env.extract(out=store)])
    assert result.exit_code == 0, result.output
    (env.tmp / "two.txt").write_text("class0\nclass1\n")
    return env.extract("--classes", env.tmp / "two.txt", out=store), [store]


def sweep(env, *extra):
    return ["sweep", "--store", env.store, "--head", "linear", "--out", env.tmp / "r", *extra]


def sweep_unreachable(env):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return sweep(env, "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "1"), [env.tmp / "r"]


def sweep_into_a_foreign_directory(env):
    (env.tmp / "r" / "store" / "linear").mkdir(parents=True)
    (env.tmp / "r" / "store" / "linear" / "notes.txt").write_text("keep me")
    return sweep(env), [env.tmp / "r"]


def broken_preprocessing(env):
    model = env.tmp / "model"
    shutil.copytree(env.model, model)
    (model / "preprocessing.json").write_text('{"preprocess": ')
    return env.extract(model=model), [model]


def knn_probe(env, *extra):
    return [
        "probe",
        "--store",
        env.store,
        "--head",
        "knn",
        "--knn-k",
        "1",
        "--threads",
        "1",
        "--out",
        env.tmp / "r",
        "--no-render",
        *extra,
    ]


def shots_over_the_smallest_class(env):
    """An earlier result in --out stays as it was."""
    assert CliRunner().invoke(main, [str(a) for a in knn_probe(env)]).exit_code == 0
    return knn_probe(env, "--shots", "1,100"), [env.store, env.tmp / "r"]


CASES = {
    "extract --data an unknown kind": (
        lambda e: (e.extract(data=f"birds:{e.data}"), []),
        1,
        "unknown data-set kind 'birds'",
    ),
    "extract --data a CUB without its class list": (
        a_cub_without("classes.txt"),
        1,
        "classes.txt is missing: CUB-200-2011 (cub:) expects",
    ),
    "extract --data a layout of no kind": (
        lambda e: (e.extract(data=e.tmp), []),
        1,
        "matches none of the data-set layouts",
    ),
    "extract --classes naming no class": (a_class_list_naming_no_class, 1, "name no class of the data set"),
    "extract --subset a file that is not there": (
        lambda e: (e.extract("--subset", e.tmp / "none.txt"), []),
        1,
        "no such file, and not a shipped list",
    ),
    "extract --classes other than the store's": (another_class_list_for_a_store, 1, "was made with other settings"),
    "extract --splits ''": (lambda e: (e.extract("--splits", ""), []), 2, "names nothing"),
    "extract --splits train,train": (lambda e: (e.extract("--splits", "train,train"), []), 2, "names something twice"),
    "extract --splits _progress": (lambda e: (e.extract("--splits", "_progress"), []), 1, "is not usable"),
    "extract --timesteps 10,10": (lambda e: (e.extract("--timesteps", "10,10"), []), 2, "more than once"),
    "extract --shard-samples not a multiple of --chunk-samples": (
        lambda e: (e.extract("--chunk-samples", "4", "--shard-samples", "6"), []),
        1,
        "is not a multiple of",
    ),
    "extract --nproc under torchrun": (torchrun_and_nproc, 2, "leave it out under torchrun"),
    "extract --storage-option without =": (
        lambda e: (e.extract("--storage-option", "anon", out="memory://bad/s.zarr"), []),
        2,
        "expected KEY=VALUE",
    ),
    "extract --out an existing file": (a_file, 1, "is a file, not a directory"),
    "extract --out under a file": (under_a_file, 1, "cannot make the store directory"),
    "extract --out a foreign directory": (a_foreign_directory, 1, "is not a feature store"),
    "a model whose config.json is broken": (broken_model("config"), 1, "not a valid JSON"),
    "a model without weights": (broken_model("weights"), 1, "cannot load it"),
    "a class folder that is a symlink loop": (symlink_loop, 1, "(a loop)"),
    "a fake image with --workers 2": (fake_image_with_workers, 1, "cannot read image"),
    "a decompression bomb": (bomb, 1, "Shrink the image"),
    # issue 24: bad data is one line naming the file and the fix (no scipy traceback, no BytesIO repr)
    "an empty PNG": (a_bad_png("empty"), 1, "img0003.png: the file is empty. Replace it with a readable copy"),
    "a truncated PNG": (a_bad_png("truncated"), 1, "img0003.png: the file is truncated or damaged. Replace it"),
    "a fake PNG": (a_bad_png("fake"), 1, "img0003.png: it is not an image file"),
    "flowers: a garbage imagelabels.mat": (
        a_garbage_mat("imagelabels.mat", b"hello, not a mat file\n" * 20),
        1,
        "imagelabels.mat: it is not a readable MATLAB file",
    ),
    "flowers: an empty setid.mat": (a_garbage_mat("setid.mat", b""), 1, "setid.mat: it is not a readable MATLAB file"),
    "probe --memory-budget inf": (
        lambda e: (["probe", "--store", e.store, "--head", "linear", "--memory-budget", "inf"], []),
        2,
        "not a finite size",
    ),
    "probe a store that is not there": (
        lambda e: (["probe", "--store", e.tmp / "none.zarr", "--head", "linear"], []),
        1,
        "no feature store",
    ),
    "probe --val-split that the store lacks": (
        lambda e: (["probe", "--store", e.store, "--head", "ridge", "--val-split", "dev", "--out", e.tmp], []),
        1,
        "has no split 'dev'",
    ),
    "pixels --pool 0": (
        lambda e: (
            ["pixels", "--data", e.data, "--out", e.tmp / "p", "--size", "8", "--channels", "3", "--pool", "0"],
            [],
        ),
        2,
        "at least 1",
    ),
    "pixels --size 100000": (
        lambda e: (["pixels", "--data", e.data, "--out", e.tmp / "p", "--size", "100000", "--channels", "3"], []),
        1,
        "choose --size",
    ),
    "convert-adm a text file": (convert_a_text_file, 1, "not a readable torch checkpoint"),
    "convert-adm --flags ''": (
        lambda e: (["convert-adm", SHARED / "fixtures" / "adm_tiny" / "model.pt", e.tmp / "o", "--flags", ""], []),
        1,
        "no flags given",
    ),
    "report on an empty configs.csv": (report_on("empty"), 1, "configs.csv is damaged"),
    "report on a truncated configs.csv": (report_on("truncated"), 1, "configs.csv is damaged"),
    "report --out a probe run": (report_into_a_probe_run, 1, "was not written by `pipeline report`"),
    "report --out a user's summary.md": (report_into_a_users_summary, 1, "was not written by `pipeline report`"),
    "pretrain --out another command's model": (pretrain_into("another model"), 1, "not written by `pipeline pretrain`"),
    "pretrain --out its own model, no --overwrite": (pretrain_into("its own"), 1, "pass --overwrite"),
    "random-init --out a trained model": (random_init_into_a_trained_model, 1, "not written by `pipeline random-init`"),
    "pretrain with a truncated image": (truncated_image_in_pretrain, 1, "cannot read image"),
    "data --per-class 3": (
        lambda e: (["data", "--out", e.tmp / "d", "--per-class", "3"], []),
        1,
        "--per-class 3 with --val-fraction 0.2",
    ),
    "sweep --workers 0": (lambda e: (sweep(e, "--workers", "0"), []), 2, "'--workers': 0 is not in the range x>=1"),
    "probe --workers 0": (
        lambda e: (["probe", "--store", e.store, "--head", "linear", "--out", e.tmp / "r", "--workers", "0"], []),
        2,
        "'--workers': 0 is not in the range x>=1",
    ),
    "sweep --cluster of an unknown kind": (
        lambda e: (sweep(e, "--cluster", "slurmm"), []),
        1,
        "unknown --cluster 'slurmm'; dask-jobqueue kinds are slurm, pbs",
    ),
    "sweep --scheduler that does not answer": (sweep_unreachable, 1, "no dask scheduler answered at tcp://127.0.0.1:"),
    "sweep two stores of one name": (
        lambda e: (sweep(e, "--store", f"store={e.store}"), []),
        1,
        "stores need distinct names",
    ),
    "sweep --out over a foreign directory": (sweep_into_a_foreign_directory, 1, "is not a probe result directory"),
    "verify a damaged store": (verify_a_damaged_store, 1, "fails its checksum"),
    "cka on a block the store lacks": (
        lambda e: (["cka", "--store", e.store, "--blocks", "7", "--out", e.tmp / "c"], [e.store]),
        1,
        "has no block 7; it holds blocks 1, 2",
    ),
    "verify --repair a store that is not there": (
        lambda e: (["verify", "--store", e.tmp / "none.zarr", "--repair"], []),
        1,
        "no feature store",
    ),
    # issue 14: views, recipes, preprocessing
    "extract --augment rotate": (
        lambda e: (e.extract("--views", "2", "--augment", "rotate"), []),
        1,
        "unknown augmentation 'rotate'",
    ),
    "extract --augment without --views": (lambda e: (e.extract("--augment", "flip"), []), 1, "has no effect"),
    "extract --views 2 --view-splits test": (
        lambda e: (e.extract("--views", "2", "--view-splits", "test"), []),
        1,
        "which --splits does not",
    ),
    "a model whose preprocessing.json is broken": (broken_preprocessing, 1, "preprocessing.json cannot be read"),
    "probe --recipe diffssl --head knn": (
        lambda e: (["probe", "--store", e.store, "--head", "knn", "--recipe", "diffssl", "--out", e.tmp], []),
        1,
        "with recipe 'diffssl'",
    ),
    "probe --views 3 on a store with one": (
        lambda e: (["probe", "--store", e.store, "--head", "linear", "--views", "3", "--out", e.tmp], []),
        1,
        "holds 1 view(s)",
    ),
    # issue 20: the field's kNN, few-shot, seeds
    "probe --shots over the smallest class": (
        shots_over_the_smallest_class,
        1,
        "--shots 100 is more than the 19 fit rows of class '0', the smallest",
    ),
    "probe --episodes 0": (
        lambda e: (knn_probe(e, "--shots", "1", "--episodes", "0"), [e.store]),
        1,
        "The 'episodes' setting of the probe must be a positive integer",
    ),
    "probe --episodes without --shots": (
        lambda e: (knn_probe(e, "--episodes", "3"), [e.store]),
        1,
        "--episodes 3 has no effect without --shots; add --shots",
    ),
    "probe --temperature 0": (
        lambda e: (knn_probe(e, "--temperature", "0"), [e.store]),
        1,
        "The 'temperature' parameter of the probe must be a float in the range (0.0, inf). Got 0.0",
    ),
    "probe --seeds empty": (lambda e: (knn_probe(e, "--seeds", ","), [e.store]), 2, "the list is empty"),
    "probe --seeds repeated": (
        lambda e: (knn_probe(e, "--seeds", "0,1,0"), [e.store]),
        2,
        "0 appear(s) more than once in '0,1,0'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_line_and_changes_nothing(env, case, monkeypatch):
    setup, code, fragment = CASES[case]
    args, protected = setup(env, monkeypatch) if setup in (bomb, torchrun_and_nproc) else setup(env)
    before = {path: digest(path) for path in protected}
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # click's exit, not an escaped exception
    assert "Traceback" not in result.output
    assert fragment in result.output, result.output
    assert "<_io." not in result.output
    assert {path: digest(path) for path in protected} == before


@pytest.mark.parametrize(
    "command",
    [
        ["extract", "--out", "s3://"],
        ["extract", "--out", "s3:///x"],
        ["verify", "--store", "s3://"],
        ["probe", "--store", "gs://", "--head", "knn"],
    ],
)
def test_an_object_store_url_without_a_bucket_is_refused_and_writes_nothing(env, command, monkeypatch):
    # issue 24: `s3://` was stripped to `s3:`, a local directory of that name, and `s3:///x` was a traceback
    monkeypatch.chdir(env.tmp)
    before = sorted(p.name for p in env.tmp.iterdir())
    if command[0] == "extract":
        command = env.extract(out=command[2])
    result = CliRunner().invoke(main, [str(a) for a in command])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "names no bucket" in line and "://BUCKET/" in line, line
    assert sorted(p.name for p in env.tmp.iterdir()) == before


@pytest.mark.parametrize("kind", ["empty", "truncated", "fake"])
def test_after_a_bad_image_is_replaced_the_same_command_finishes_the_store(env, kind):
    # issue 24: what a bad image's run leaves behind is a store the rerun finishes, equal to a clean run's
    import numpy as np

    from cache import FeatureStore

    setup = a_bad_png(kind)
    args, _ = setup(env)
    png = env.tmp / "d" / "train" / "class1" / "img0003.png"
    make_image_folder(env.tmp / "good", counts={"train": 6, "val": 2}, classes=2)
    good = env.tmp / "good" / "train" / "class1" / "img0003.png"
    failed = CliRunner().invoke(main, [str(a) for a in args])
    assert failed.exit_code == 1 and "Replace it with a readable copy and run the same command again" in failed.output
    assert not (env.tmp / "new.zarr").exists() or not any((env.tmp / "new.zarr").iterdir())  # nothing half-written
    png.write_bytes(good.read_bytes())
    again = CliRunner().invoke(main, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    clean = CliRunner().invoke(main, [str(a) for a in env.extract(data=env.tmp / "good", out=env.tmp / "clean.zarr")])
    assert clean.exit_code == 0, clean.output
    ours, theirs = FeatureStore.open(env.tmp / "new.zarr"), FeatureStore.open(env.tmp / "clean.zarr")
    for split in ("train", "val"):
        np.testing.assert_array_equal(ours.read(split, 3, 10), theirs.read(split, 3, 10))

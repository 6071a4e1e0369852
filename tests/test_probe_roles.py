"""Named split roles: the train split, an official validation split or a carved subset, the test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import main
from stages.probe.plan import ProbeInputError
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings
from stages.probe.sklearn_probes import RidgeProbe

from helpers import digits_features, write_store

FAST = dict(threads=1, epochs=4, batch_size=64)


def split_three_ways(features, labels):
    """digits' train split cut into train (900 rows) and val (every 4th row: 300, every class); its val split
    renamed test."""
    every = np.arange(1200)
    rows = {"train": every[every % 4 != 0], "val": every[every % 4 == 0]}

    def cut(by_split):
        return {
            "train": by_split["train"][rows["train"]],
            "val": by_split["train"][rows["val"]],
            "test": by_split["val"],
        }

    return {key: cut(value) for key, value in features.items()}, cut(labels)


@pytest.fixture(scope="module")
def three_way(tmp_path_factory):
    features, labels = split_three_ways(*digits_features())
    return write_store(tmp_path_factory.mktemp("roles") / "three.zarr", features, labels, pools=(1, 2))


@pytest.fixture(scope="module")
def train_test(tmp_path_factory):
    features, labels = digits_features()
    rename = lambda d: {"train": d["train"], "test": d["val"]}  # noqa: E731
    return write_store(
        tmp_path_factory.mktemp("roles") / "two.zarr",
        {k: rename(v) for k, v in features.items()},
        rename(labels),
        pools=(1,),
    )


def test_a_train_test_store_is_scored_on_test_with_validation_carved_from_train(train_test, tmp_path):
    result = run_probe(ProbeSettings(store=str(train_test), head="ridge", out=str(tmp_path), threads=1))
    store = FeatureStore.open(train_test)
    assert result.record["splits"] == {
        "train": "train",
        "validation": "train (a stratified 0.1 of it, seed 0)",
        "test": "test",
    }
    assert result.record["samples"]["test"] == store.num_samples("test")
    assert result.record["samples"]["fit"] + result.record["samples"]["val"] == store.num_samples("train")
    predictions = np.load(result.run_dir / "predictions.npz")
    np.testing.assert_array_equal(predictions["labels"], store.labels("test"))


def test_an_official_validation_split_chooses_and_the_test_split_scores(three_way, tmp_path):
    store = FeatureStore.open(three_way)
    result = run_probe(
        ProbeSettings(
            store=str(three_way),
            head="ridge",
            out=str(tmp_path),
            blocks=(1,),
            timesteps=(90,),
            pools=(2,),
            val_split="val",
            threads=1,
        )
    )
    assert result.record["splits"] == {"train": "train", "validation": "val", "test": "test"}
    samples = result.record["samples"]
    assert (samples["fit"], samples["val"], samples["test"]) == (900, 300, store.num_samples("test"))
    subset = json.loads((result.run_dir / "validation_subset.json").read_text())
    assert subset["split"] == "val" and subset["indices"] == list(range(300))

    # the same choice as RidgeProbe fitted on every train row and chosen on the val split, by hand
    x = {s: store.read(s, 1, 90, pool=2).reshape(store.num_samples(s), -1) for s in ("train", "val", "test")}
    mean, std = x["train"].mean(0), x["train"].std(0)
    std[std < 1e-6] = 1
    std_x = {s: (v - mean) / std for s, v in x.items()}
    alphas = ProbeSettings(store="", head="ridge").alphas
    reference = RidgeProbe(alphas=alphas).fit(std_x["train"], store.labels("train"), std_x["val"], store.labels("val"))
    (chosen,) = [r for r in result.rows if r["selected"]]
    assert chosen["alpha"] == reference.best_alpha_
    assert chosen["test_top1"] == pytest.approx(reference.score(std_x["test"], store.labels("test")), abs=1e-3)


def test_streamed_and_in_memory_training_agree_with_an_official_validation_split(three_way, tmp_path):
    common = dict(
        store=str(three_way),
        head="linear",
        timesteps=(90,),
        pools=(2,),
        lrs=(1e-3, 1e-2),
        val_split="val",
        shuffle_window=256,
        **FAST,
    )
    memory = run_probe(ProbeSettings(out=str(tmp_path / "memory"), data_mode="memory", **common))
    stream = run_probe(ProbeSettings(out=str(tmp_path / "stream"), data_mode="stream", **common))
    assert memory.rows == stream.rows
    assert {r["key"] for r in memory.rows if r["selected"]} == {"b1_t90_p2", "b2_t90_p2"}


@pytest.mark.parametrize(
    "roles, fragment",
    [
        ({"val_split": "dev"}, "has no split 'dev' for --val-split"),
        ({"test_split": "holdout"}, "has no split 'holdout' for --test-split"),
        ({"train_split": "all"}, "has no split 'all' for --train-split"),
    ],
)
def test_a_split_the_store_lacks_is_named_with_the_ones_it_has(three_way, tmp_path, roles, fragment):
    with pytest.raises(ProbeInputError, match=fragment) as error:
        run_probe(ProbeSettings(store=str(three_way), head="ridge", out=str(tmp_path), **roles))
    assert "it has train, val, test" in str(error.value)


def test_one_split_in_two_roles_is_refused():
    with pytest.raises(ValueError, match="three different splits"):
        ProbeSettings(store="s", head="ridge", val_split="train")
    with pytest.raises(ValueError, match="three different splits"):
        ProbeSettings(store="s", head="ridge", val_split="val", test_split="val")


def test_the_command_takes_the_roles(three_way, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(three_way),
            "--head",
            "ridge",
            "--val-split",
            "val",
            "--test-split",
            "test",
            "--pool",
            "1",
            "--out",
            str(tmp_path),
            "--no-render",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "ridge" / "run.json").read_text())
    assert record["splits"] == {"train": "train", "validation": "val", "test": "test"}
    assert not (tmp_path / "ridge" / "summary.md").exists()  # --no-render: the report stage draws it

"""The probe sweep on stores written directly from known features."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import stages.probe.plan as probe_plan
from cache import FeatureStore, IncompleteStoreError
from pipeline.options import parse_byte_size
from stages.probe.heads import load_probe
from stages.probe.plan import MemoryBudgetError, ProbeInputError, carve_validation, make_plan
from stages.probe.registry import HEADS
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings, halving_rungs
from stages.report import render_run

from helpers import digits_features, write_store

FAST = dict(threads=1, epochs=10, batch_size=64)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    features, labels = digits_features()
    # stored at 8x8 of a 16x16 block: pools 1, 2, 4 and 8 are readable, 3 is not
    return write_store(
        tmp_path_factory.mktemp("digits") / "store.zarr",
        features,
        labels,
        pools=(1, 2, 4, 8),
        resolution={1: 16, 2: 16},
    )


def separable_features(seed=0, n=(240, 120), classes=6, channels=8, grid=4):
    """Class means of norm 10 in random channel directions, the same in every cell, unit noise per
    element: linearly separable with a wide margin at every pool size."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, channels))
    centres = (10 * centres / np.linalg.norm(centres, axis=1, keepdims=True))[:, :, None, None]
    features, labels = {}, {}
    for split, count in zip(("train", "val"), n):
        y = np.sort(np.arange(count) % classes)
        labels[split] = y
        x = (centres[y] + rng.normal(size=(count, channels, grid, grid))).astype(np.float32)
        features.setdefault((3, 50), {})[split] = x
        features.setdefault((3, 100), {})[split] = x * 2 + 1
    return features, labels


@pytest.fixture(scope="module")
def separable_store(tmp_path_factory) -> Path:
    features, labels = separable_features()
    return write_store(tmp_path_factory.mktemp("sep") / "store.zarr", features, labels, chunk_samples=32, pools=(1, 4))


def rows_of(run_dir: Path) -> list[dict]:
    with open(run_dir / "configs.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_probe(run_a: Path, run_b: Path, key: str, **tolerance) -> None:
    """The saved probes `key` of two runs hold the same weights and buffers."""
    a, _ = load_probe(run_a / "heads" / key)
    b, _ = load_probe(run_b / "heads" / key)
    assert list(a.state_dict()) == list(b.state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name, **tolerance)


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*")):
        info = file.stat()
        digest.update(f"{file.relative_to(path)}:{info.st_mode}:{info.st_mtime_ns}".encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


# -- accuracy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "head,extra",
    [
        ("linear", {}),
        ("mlp", {"hidden": (32,), "lrs": (1e-3, 1e-2)}),
        ("cnn", {"width": 16, "pools": (4,)}),
        pytest.param(
            "attention", {"dim": 32, "depth": 1, "attention_heads": 2, "pools": (4,)}, marks=pytest.mark.slow
        ),  # the slowest head to train
        ("logreg", {"Cs": (0.1, 1.0)}),
        ("knn", {"ks": (1, 5)}),
        ("ridge", {"alphas": (1.0, 10.0)}),
    ],
)
def test_a_linearly_separable_store_reaches_100_percent(separable_store, tmp_path, head, extra):
    settings = {**FAST, "epochs": 30, "pools": (1,), **extra}
    result = run_probe(ProbeSettings(store=str(separable_store), head=head, out=str(tmp_path), **settings))
    chosen = [r for r in result.rows if r["selected"]]
    assert len(chosen) == 2  # two timesteps
    assert all(r["test_top1"] == 1.0 for r in chosen), [(r["key"], r["test_top1"]) for r in chosen]
    assert result.metrics["best"]["test_top1"] == 1.0


def _sklearn_on_fit_rows(store: FeatureStore, run_dir: Path, block: int, timestep: int, pool: int, C: float):
    """scikit-learn's LogisticRegression on the probe's own fit rows, standardised with fit statistics."""
    val = np.array(json.loads((run_dir / "validation_subset.json").read_text())["indices"])
    train, test = store.read("train", block, timestep, pool), store.read("val", block, timestep, pool)
    fit = np.setdiff1d(np.arange(len(train)), val)
    x_fit = train[fit].reshape(len(fit), -1)
    mean, std = x_fit.mean(0), x_fit.std(0)
    std[std < 1e-6] = 1
    model = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit((x_fit - mean) / std, store.labels("train")[fit])
    x_test = (test.reshape(len(test), -1) - mean) / std
    return model.predict(x_test), model.score(x_test, store.labels("val"))


def test_logreg_probe_agrees_with_scikit_learn_on_digits(digits_store, tmp_path):
    store = FeatureStore.open(digits_store)
    result = run_probe(
        ProbeSettings(
            store=str(digits_store),
            head="logreg",
            out=str(tmp_path),
            blocks=(1,),
            timesteps=(10,),
            pools=(8,),
            Cs=(1.0,),
            threads=1,
        )
    )
    predicted, accuracy = _sklearn_on_fit_rows(store, result.run_dir, 1, 10, 8, 1.0)
    ours = np.load(result.run_dir / "predictions.npz")["b1_t10_p8"][:, 0]
    assert abs(result.metrics["best"]["test_top1"] - accuracy) <= 0.01
    assert np.mean(ours == predicted) >= 0.99


def test_linear_head_agrees_with_scikit_learn_on_digits(digits_store, tmp_path):
    """With SGD on the same objective (L2 weight decay 1/(C n), bias not decayed, full batch) the torch
    linear head lands where LogisticRegression(C) does."""
    store = FeatureStore.open(digits_store)
    n_fit = len(FeatureStore.open(digits_store).labels("train")) - len(
        carve_validation(store.labels("train"), np.arange(1200), 0.1, 0)[1]
    )
    result = run_probe(
        ProbeSettings(
            store=str(digits_store),
            head="linear",
            out=str(tmp_path),
            blocks=(1, 2),
            timesteps=(10,),
            pools=(8,),
            optimizer="sgd",
            lrs=(0.3,),
            weight_decays=(1 / n_fit,),
            batch_size=n_fit,
            epochs=300,
            warmup=0.0,
            threads=1,
        )
    )
    predictions = np.load(result.run_dir / "predictions.npz")
    for row in (r for r in result.rows if r["selected"]):
        block = int(row["blocks"])
        predicted, accuracy = _sklearn_on_fit_rows(store, result.run_dir, block, 10, 8, 1.0)
        assert abs(row["test_top1"] - accuracy) <= 0.01, (row["key"], row["test_top1"], accuracy)
        assert np.mean(predictions[row["key"]][:, 0] == predicted) >= 0.97


def test_default_linear_sweep_is_close_to_scikit_learn_on_digits(digits_store, tmp_path):
    """The default recipe (AdamW lr grid, cosine), selection on 20% of train, against LogisticRegression(C=1)."""
    store = FeatureStore.open(digits_store)
    result = run_probe(
        ProbeSettings(
            store=str(digits_store),
            head="linear",
            out=str(tmp_path),
            blocks=(1,),
            timesteps=(10,),
            pools=(8,),
            batch_size=64,
            val_fraction=0.2,
            threads=1,
        )
    )
    _, accuracy = _sklearn_on_fit_rows(store, result.run_dir, 1, 10, 8, 1.0)
    assert abs(result.metrics["best"]["test_top1"] - accuracy) <= 0.01, (result.metrics["best"], accuracy)


# -- streaming ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "head,extra",
    [
        ("linear", {"batchnorm": True, "pools": (1, 2)}),
        ("mlp", {"hidden": (16,), "pools": (2,)}),
        pytest.param(
            "attention",
            {"dim": 16, "depth": 1, "attention_heads": 2, "pools": (2,), "epochs": 3},
            marks=pytest.mark.slow,
        ),  # the slowest head to train
    ],
)
def test_streamed_training_equals_in_memory_training(digits_store, tmp_path, head, extra):
    common = dict(
        store=str(digits_store),
        head=head,
        timesteps=(90,),
        shuffle_window=256,
        lrs=(1e-3, 1e-2),
        **{**FAST, "epochs": 4, **extra},
    )
    memory = run_probe(ProbeSettings(out=str(tmp_path / "memory"), data_mode="memory", **common))
    stream = run_probe(ProbeSettings(out=str(tmp_path / "stream"), data_mode="stream", **common))
    # a budget too small for everything at once: one pass per input set, same results
    passes = run_probe(ProbeSettings(out=str(tmp_path / "passes"), data_mode="memory", memory_budget=50_000, **common))
    assert memory.record["data_mode"] == "memory" and stream.record["data_mode"] == "stream"
    assert passes.record["passes"] > 1
    for other in (stream, passes):
        assert rows_of(other.run_dir) == rows_of(memory.run_dir)
        for key in (r["key"] for r in memory.rows if r["selected"]):
            assert_same_probe(memory.run_dir, other.run_dir, key, rtol=1e-5, atol=1e-6)


def test_automatic_mode_streams_when_the_budget_is_small(digits_store, tmp_path, monkeypatch):
    # this budget is the features' alone: 1,200 x 64 features do not fit it, a window of 128 rows does
    monkeypatch.setattr(probe_plan, "process_floor", lambda torch_head: 0)
    result = run_probe(
        ProbeSettings(
            store=str(digits_store),
            head="linear",
            out=str(tmp_path),
            blocks=(1,),
            timesteps=(10,),
            pools=(8,),
            memory_budget=300_000,
            shuffle_window=128,
            read_threads=1,
            **FAST,
        )
    )
    assert result.record["data_mode"] == "stream"


def test_an_explicit_budget_is_the_processs_and_refuses_a_window_that_does_not_fit(
    digits_store, tmp_path, monkeypatch, caplog
):
    floor = 700 << 20  # what the process holds before any feature
    monkeypatch.setattr(probe_plan, "process_floor", lambda torch_head: floor)
    store = FeatureStore.open(digits_store)
    common = dict(
        store=str(digits_store),
        head="linear",
        out=str(tmp_path),
        blocks=(1,),
        timesteps=(10,),
        pools=(1,),
        data_mode="stream",
        read_threads=1,
        **FAST,
    )
    # the plan's stream cost, recomputed: a window of float32 rows, 4 x read_threads chunks read at a time (stored
    # and pooled), 16 bytes per trained parameter (weight, gradient, two AdamW moments) of every member
    dim, chunk, info = store.block_info(1)["channels"], store.chunk_samples, store.block_info(1)
    settings = ProbeSettings(**common)
    fixed = 4 * 4 * chunk * (info["channels"] * info["grid"] ** 2 + dim) + 16 * len(settings.hypers()) * HEADS[
        "linear"
    ].parameters(dim, len(store.classes), settings.head_options())
    left = fixed + 4 * dim * 5 * chunk + 100
    budget = floor + left + left // 7  # 7/8 of what it leaves (the advice's margin) holds five store chunks, not six
    with pytest.raises(MemoryBudgetError) as refused:
        make_plan(store, ProbeSettings(memory_budget=budget, shuffle_window=64 * chunk, **common))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("b1_t10_p1 needs ")
    assert f"pass --shuffle-window {5 * chunk} or --memory-budget " in message
    advised = int(message.split("--shuffle-window ")[1].split()[0])
    plan = make_plan(store, ProbeSettings(memory_budget=budget, shuffle_window=advised, **common))
    assert plan.mode == "stream" and plan.window_chunks == 5
    # the advised budget fits the window asked for
    bigger = parse_byte_size(message.rsplit("--memory-budget ", 1)[1])
    assert make_plan(store, ProbeSettings(memory_budget=bigger, shuffle_window=64 * chunk, **common)).mode == "stream"
    # a budget under the process's floor leaves no window: only a budget is advised
    with pytest.raises(MemoryBudgetError, match=r"leaves after the process's 700\.0 MB; pass --memory-budget 701MB$"):
        make_plan(store, ProbeSettings(memory_budget=floor // 2, shuffle_window=chunk, **common))
    # without an explicit budget it is only a warning
    monkeypatch.setattr(probe_plan, "available_memory", lambda: 2 * fixed)  # half of it: no room for a window
    with caplog.at_level("WARNING", logger="stages.probe.plan"):
        assert make_plan(store, ProbeSettings(shuffle_window=64 * chunk, **common)).mode == "stream"
    assert "trying anyway" in caplog.text


# -- honest selection --------------------------------------------------------------------------------
@pytest.mark.slow  # four probe runs on two stores
def test_selection_never_sees_the_test_split(tmp_path):
    features, labels = digits_features()
    clean = write_store(tmp_path / "clean.zarr", features, labels, pools=(2,))
    rng = np.random.default_rng(1)
    corrupted_labels = {"train": labels["train"], "val": rng.permutation(labels["val"])}
    corrupted_features = {
        key: {"train": v["train"], "val": rng.normal(size=v["val"].shape).astype(np.float32)}
        for key, v in features.items()
    }
    corrupted = write_store(tmp_path / "corrupted.zarr", corrupted_features, corrupted_labels, pools=(2,))
    runs = {}
    for name, store in (("clean", clean), ("corrupted", corrupted)):
        for head, extra in (("linear", {"lrs": (1e-4, 1e-3, 1e-2)}), ("logreg", {"Cs": (0.01, 0.1, 1.0)})):
            runs[name, head] = run_probe(
                ProbeSettings(store=str(store), head=head, out=str(tmp_path / name), pools=(2,), **FAST, **extra)
            )
    for head in ("linear", "logreg"):
        clean_rows, corrupted_rows = runs["clean", head].rows, runs["corrupted", head].rows
        strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("test")} for r in rows]  # noqa: E731
        assert strip(clean_rows) == strip(corrupted_rows)  # validation scores and choices are unchanged
        chosen_clean = [r["test_top1"] for r in clean_rows if r["selected"]]
        assert chosen_clean != [r["test_top1"] for r in corrupted_rows if r["selected"]]
        assert max(r["test_top1"] for r in corrupted_rows if r["selected"]) < 0.3
        assert all(r["test_top1"] == "" for r in clean_rows if not r["selected"])  # test scored for chosen only


def test_validation_subset_is_seeded_stratified_and_recorded(digits_store, tmp_path):
    labels = FeatureStore.open(digits_store).labels("train")
    fit, val = carve_validation(labels, np.arange(len(labels)), 0.1, seed=3)
    again = carve_validation(labels, np.arange(len(labels)), 0.1, seed=3)[1]
    np.testing.assert_array_equal(val, again)
    assert not set(fit) & set(val) and len(fit) + len(val) == len(labels)
    assert np.all(np.abs(np.bincount(labels[val]) - 0.1 * np.bincount(labels)) <= 1)
    result = run_probe(
        ProbeSettings(store=str(digits_store), head="ridge", out=str(tmp_path), pools=(1,), seed=3, threads=1)
    )
    recorded = json.loads((result.run_dir / "validation_subset.json").read_text())
    assert recorded["indices"] == val.tolist() and recorded["seed"] == 3
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["store_fingerprint"] == FeatureStore.open(digits_store).fingerprint
    assert record["settings"]["alphas"] == list(ProbeSettings(store="", head="ridge").alphas)


# -- saved results ---------------------------------------------------------------------------------------
def test_saved_probes_reproduce_the_test_predictions_from_raw_store_features(digits_store, tmp_path):
    store = FeatureStore.open(digits_store)
    for head, extra in (
        ("linear", {}),
        ("attention", {"dim": 16, "depth": 1, "attention_heads": 2, "epochs": 2}),
        ("logreg", {"Cs": (1.0,)}),
    ):
        result = run_probe(
            ProbeSettings(
                store=str(digits_store),
                head=head,
                out=str(tmp_path),
                blocks=(2,),
                timesteps=(10, 90),
                pools=(4,),
                fuse=head == "attention",
                **{**FAST, **extra},
            )
        )
        predictions = np.load(result.run_dir / "predictions.npz")
        for key in (r["key"] for r in result.rows if r["selected"]):
            probe, config = load_probe(result.run_dir / "heads" / key)
            inputs = [
                torch.from_numpy(store.read("val", r["block"], r["timestep"], r["pool"])) for r in config["reads"]
            ]
            with torch.no_grad():
                top1 = probe(*inputs).argmax(dim=1).numpy()
            np.testing.assert_array_equal(top1, predictions[key][:, 0])
            assert config["store_fingerprint"] == store.fingerprint


def test_results_layout_and_metrics(separable_store, tmp_path):
    run_probe(ProbeSettings(store=str(separable_store), head="linear", out=str(tmp_path), pools=(1, 4), **FAST))
    run_dir = tmp_path / "linear"
    render_run(run_dir)  # what `pipeline probe` does after the run: the report module draws from the results
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "configs.csv",
        "run.json",
        "metrics.json",
        "predictions.npz",
        "validation_subset.json",
        "summary.md",
        "heatmap_pool1.png",
        "heatmap_pool4.png",
        "heads",
    } <= names
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["best"]) >= {"key", "blocks", "timesteps", "pool", "lr", "val_top1", "test_top1", "test_top5"}
    assert set(metrics["by_pool"]) == {"1", "4"}
    rows = rows_of(run_dir)
    assert len(rows) == 2 * 2 * len(HEADS["linear"].grid[0].default)  # timesteps x pools x default lr grid
    assert {r["key"] for r in rows if r["selected"] == "1"} == {p.stem for p in (run_dir / "heads").glob("*.json")}
    assert not list(tmp_path.glob(".*partial"))


# -- bad inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_, fragment",
    [
        ({"blocks": (7,)}, "block(s) 7 not stored"),
        ({"timesteps": (10, 11)}, "block 1 has no timestep(s) 11"),
        ({"pools": (3,)}, "cannot be read at pool 3"),
    ],
)
def test_what_the_store_lacks_is_an_error_listing_what_it_has(digits_store, tmp_path, request_, fragment):
    with pytest.raises(ProbeInputError) as error:
        run_probe(ProbeSettings(store=str(digits_store), head="linear", out=str(tmp_path), **request_))
    message = str(error.value)
    assert fragment in message
    assert "block 1: timesteps [10, 90], pools [1, 2, 4, 8]" in message and "block 2: timesteps [10, 90]" in message
    assert not (tmp_path / "linear").exists()


def test_an_unfinished_store_is_refused_unless_allowed(tmp_path):
    features, labels = digits_features()
    store = write_store(
        tmp_path / "partial.zarr",
        features,
        labels,
        pools=(1,),
        skip_chunks={("train", 1, 90): [2, 3, 4], ("val", 2, 10): [0]},
    )
    with pytest.raises(IncompleteStoreError) as error:
        run_probe(ProbeSettings(store=str(store), head="logreg", out=str(tmp_path / "r"), threads=1))
    assert "train block 1 timestep 90: chunks 2-4" in str(error.value)
    assert "val block 2 timestep 10: chunks 0" in str(error.value) and "--allow-incomplete" in str(error.value)
    # only the arrays a probe reads matter
    run_probe(
        ProbeSettings(store=str(store), head="ridge", out=str(tmp_path / "r"), blocks=(2,), timesteps=(90,), threads=1)
    )
    result = run_probe(
        ProbeSettings(store=str(store), head="ridge", out=str(tmp_path / "r"), allow_incomplete=True, threads=1)
    )
    assert result.record["samples"]["train"] == 1200
    assert result.record["samples"]["fit"] + result.record["samples"]["val"] == 1200 - 3 * 64
    assert result.record["samples"]["test"] == 597 - 64
    predictions = np.load(result.run_dir / "predictions.npz")
    assert predictions["index"].min() == 64 and len(predictions["labels"]) == 597 - 64


def test_a_read_only_store_is_probed_and_left_unchanged(tmp_path):
    features, labels = separable_features()
    store = write_store(tmp_path / "ro.zarr", features, labels, chunk_samples=32, pools=(1,))
    before = tree_digest(store)
    modes = {}
    for path in [store, *store.rglob("*")]:
        modes[path] = path.stat().st_mode
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        for head in ("linear", "knn"):
            result = run_probe(ProbeSettings(store=str(store), head=head, out=str(tmp_path / "r"), **FAST))
            assert result.metrics["best"]["test_top1"] == 1.0
    finally:
        for path, mode in sorted(modes.items(), key=lambda item: -len(item[0].parts)):
            os.chmod(path, mode)
    assert tree_digest(store) == before


def test_settings_are_validated_in_one_place():
    with pytest.raises(ValueError, match="The 'val_fraction' setting of the probe must be a float in the range"):
        ProbeSettings(store="s", head="linear", val_fraction=1.5)
    with pytest.raises(ValueError, match="The 'head' setting"):
        ProbeSettings(store="s", head="svm")
    with pytest.raises(ValueError, match="The 'lrs' parameter of the probe must be a non-empty sequence"):
        ProbeSettings(store="s", head="linear", lrs=(-1.0,))
    with pytest.raises(ValueError, match="The 'ks' parameter"):
        ProbeSettings(store="s", head="knn", ks=(0,))


# -- successive halving --------------------------------------------------------------------------------
def test_halving_rungs_are_geometric_and_end_with_one_member():
    assert halving_rungs(4, 10) == [(2, 2), (5, 1)]
    assert halving_rungs(8, 16) == [(2, 4), (4, 2), (8, 1)]
    assert halving_rungs(3, 20) == [(5, 2), (10, 1)]
    assert halving_rungs(4, 2) == [(1, 1)]  # rungs that fall on one epoch merge
    assert halving_rungs(4, 1) == [] and halving_rungs(1, 10) == []


def test_halving_retires_members_and_the_survivor_trains_as_it_would_alone(digits_store, tmp_path):
    common = dict(store=str(digits_store), head="linear", blocks=(1, 2), timesteps=(10,), pools=(2,), **FAST)
    halved = run_probe(ProbeSettings(out=str(tmp_path / "halved"), **common))
    assert halved.record["halving"] == [{"after_epoch": 2, "keep": 2}, {"after_epoch": 5, "keep": 1}]
    for key in {r["key"] for r in halved.rows}:
        rows = [r for r in halved.rows if r["key"] == key]
        assert sorted(r["epochs"] for r in rows) == [2, 2, 5, 10]
        (chosen,) = [r for r in rows if r["selected"]]
        assert chosen["epochs"] == 10
        # the same member trained without the others, with the same seed, schedule and batches
        alone = run_probe(
            ProbeSettings(
                out=str(tmp_path / key),
                lrs=(chosen["lr"],),
                halving=False,
                **{**common, "blocks": (int(chosen["blocks"]),)},
            )
        )
        (row,) = alone.rows
        assert row["val_top1"] == pytest.approx(chosen["val_top1"])
        assert row["test_top1"] == pytest.approx(chosen["test_top1"])
        assert_same_probe(halved.run_dir, alone.run_dir, key, rtol=1e-4, atol=1e-5)


def test_without_halving_every_member_trains_every_epoch(digits_store, tmp_path):
    result = run_probe(
        ProbeSettings(
            store=str(digits_store),
            head="linear",
            out=str(tmp_path),
            blocks=(1,),
            timesteps=(10,),
            pools=(2,),
            halving=False,
            **FAST,
        )
    )
    assert result.record["halving"] == [] and {r["epochs"] for r in result.rows} == {10}

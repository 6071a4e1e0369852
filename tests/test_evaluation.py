"""What a probe run reports beyond top-1: top-5, balanced and per-class accuracy against scikit-learn on
the saved predictions, bootstrap intervals, seeds, few-shot episodes, and one run record for every engine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import balanced_accuracy_score, recall_score, top_k_accuracy_score

from cache import FeatureStore
from pipeline.cli import main
from stages.probe.fewshot import few_shot_rows
from stages.probe.metrics import BOOTSTRAP, bootstrap_intervals, mean_std
from stages.probe.plan import ProbeInputError
from stages.probe.results import ENGINE_FIELDS, read_run
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings
from stages.report import build_report, render_run
from stages.sweep.plan import StoreRef
from stages.sweep.run import run_sweep
from stages.transfer import build_transfer

from helpers import digits_features, write_store

KNN = dict(threads=1, blocks=(1,), timesteps=(10,), ks=(1, 5))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    features, labels = digits_features(n_train=600)
    return write_store(
        tmp_path_factory.mktemp("evaluation") / "dogs.zarr",
        features,
        labels,
        pools=(1, 2),
        resolution={1: 8, 2: 8},
        data_kind="dogs",
        classes=[f"digit {i}" for i in range(10)],
    )


@pytest.fixture(scope="module")
def knn_run(store, tmp_path_factory):
    return run_probe(
        ProbeSettings(
            store=str(store),
            head="knn",
            out=str(tmp_path_factory.mktemp("knn")),
            blocks=(1, 2),
            pools=(1, 2),
            timesteps=(10, 90),
            threads=1,
            ks=(1, 5, 20),
        )
    )


# -- metrics against scikit-learn -----------------------------------------------------------------------
def test_top5_balanced_and_per_class_accuracy_are_scikit_learns_on_the_saved_predictions(knn_run):
    record, rows = read_run(knn_run.run_dir)
    chosen = [r for r in rows if r["selected"] == 1]
    assert len(chosen) == 8
    with np.load(knn_run.run_dir / "predictions.npz") as saved:
        labels = saved["labels"]
        for row in chosen:
            top = saved[row["key"]]
            # a score per class from the ranked top-5: 5 for the first, 1 for the fifth, 0 for the rest
            scores = np.zeros((len(top), 10))
            np.put_along_axis(scores, top, np.arange(5, 0, -1, dtype=float)[None, :], axis=1)
            assert row["test_top1"] == pytest.approx(
                top_k_accuracy_score(labels, scores, k=1, labels=range(10)), abs=1e-6
            )
            assert row["test_top5"] == pytest.approx(
                top_k_accuracy_score(labels, scores, k=5, labels=range(10)), abs=1e-6
            )
            assert row["test_balanced"] == pytest.approx(balanced_accuracy_score(labels, top[:, 0]), abs=1e-6)
            assert row["test_top1_low"] <= row["test_top1"] <= row["test_top1_high"]
            assert row["test_top5_low"] <= row["test_top5"] <= row["test_top5_high"]
            assert row["test_balanced_low"] <= row["test_balanced"] <= row["test_balanced_high"]
        metrics = json.loads((knn_run.run_dir / "metrics.json").read_text())
        best = metrics["best"]
        recall = recall_score(labels, saved[best["key"]][:, 0], average=None, labels=range(10))
    with open(knn_run.run_dir / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [r["name"] for r in per_class] == [f"digit {i}" for i in range(10)]
    assert [int(r["test_samples"]) for r in per_class] == np.bincount(labels).tolist()
    np.testing.assert_allclose([float(r["test_accuracy"]) for r in per_class], recall, atol=1e-6)
    assert record["bootstrap"] == {**BOOTSTRAP, "seed": 0}
    for key in ("test_top5", "test_balanced", "test_top1_low", "test_top1_high"):
        assert key in best


def test_the_chosen_configuration_gets_a_confusion_matrix_and_the_report_its_evaluation(knn_run, tmp_path):
    render_run(knn_run.run_dir, tmp_path / "rendered")
    image = tmp_path / "rendered" / "confusion.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    summary = (tmp_path / "rendered" / "summary.md").read_text()
    assert "![confusion](confusion.png)" in summary and "balanced accuracy" in summary and "[" in summary
    build_report({"pretrained": knn_run.run_dir}, tmp_path / "report")
    evaluation = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    best = knn_run.metrics["best"]
    assert evaluation == {
        "knn": {
            "pretrained": {
                k: best[k]
                for k in (
                    "val_top1",
                    "test_top1",
                    "test_top5",
                    "test_top1_low",
                    "test_top1_high",
                    "test_top5_low",
                    "test_top5_high",
                    "test_balanced",
                    "test_balanced_low",
                    "test_balanced_high",
                )
            }
        }
    }


def test_top5_is_left_out_with_five_classes_or_fewer(tmp_path):
    features, labels = digits_features(n_train=300)
    keep = {split: y < 5 for split, y in labels.items()}
    features = {key: {s: x[keep[s]] for s, x in value.items()} for key, value in features.items()}
    labels = {s: y[keep[s]] for s, y in labels.items()}
    path = write_store(tmp_path / "five.zarr", features, labels)
    result = run_probe(ProbeSettings(store=str(path), head="knn", out=str(tmp_path / "r"), **KNN))
    chosen = [r for r in read_run(result.run_dir)[1] if r["selected"] == 1]
    assert chosen and all(r["test_top5"] is None and r["test_top5_low"] is None for r in chosen)
    assert all(r["test_balanced"] is not None for r in chosen)


# -- bootstrap --------------------------------------------------------------------------------------------
def test_bootstrap_intervals_are_the_definitions_reproducible_and_cover_the_estimate():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 300)
    correct = rng.random((300, 3)) < np.array([0.5, 0.8, 0.95])
    intervals = bootstrap_intervals(correct, labels, seed=7)
    np.testing.assert_array_equal(intervals, bootstrap_intervals(correct, labels, seed=7))
    assert not np.array_equal(intervals, bootstrap_intervals(correct, labels, seed=8))
    # the definition: 1000 resamples of the test samples with replacement, the 2.5th and 97.5th percentiles
    draws = np.random.default_rng([7, 2])
    means = np.concatenate([correct[draws.integers(0, 300, size=(100, 300))].mean(axis=1) for _ in range(10)])
    np.testing.assert_allclose(intervals, np.percentile(means, [2.5, 97.5], axis=0).T)
    estimate = correct.mean(axis=0)
    assert np.all(intervals[:, 0] <= estimate) and np.all(estimate <= intervals[:, 1])
    assert np.all(np.diff(intervals[:, 1] - intervals[:, 0]) < 0)  # narrower as accuracy nears 1
    balanced = bootstrap_intervals(correct, labels, seed=7, balanced=True)
    draws = np.random.default_rng([7, 2])
    values = []
    for _ in range(10):
        for sample in draws.integers(0, 300, size=(100, 300)):
            values.append(np.mean([correct[sample][labels[sample] == c].mean(axis=0) for c in range(4)], axis=0))
    np.testing.assert_allclose(balanced, np.percentile(values, [2.5, 97.5], axis=0).T)


def test_mean_and_standard_deviation_over_repeats():
    assert mean_std([0.5, 0.7]) == {
        "mean": pytest.approx(0.6),
        "std": pytest.approx(np.std([0.5, 0.7], ddof=1)),
        "n": 2,
        "values": [0.5, 0.7],
    }
    assert mean_std([0.5])["std"] == 0.0


# -- few-shot ---------------------------------------------------------------------------------------------
def test_few_shot_subsets_are_class_balanced_reproducible_and_nested_across_shot_counts():
    labels = np.repeat(np.arange(4), [9, 12, 7, 30])
    rows = np.flatnonzero(np.arange(len(labels)) % 5 != 0)  # fit rows: some carved away
    one = few_shot_rows(labels, rows, shots=1, episode=0, seed=0)
    five = few_shot_rows(labels, rows, shots=5, episode=0, seed=0)
    assert np.bincount(labels[five]).tolist() == [5, 5, 5, 5] and np.bincount(labels[one]).tolist() == [1, 1, 1, 1]
    assert set(five) <= set(rows) and set(one) <= set(five)  # nested within an episode
    np.testing.assert_array_equal(five, few_shot_rows(labels, rows, shots=5, episode=0, seed=0))
    assert not np.array_equal(five, few_shot_rows(labels, rows, shots=5, episode=1, seed=0))
    assert not np.array_equal(five, few_shot_rows(labels, rows, shots=5, episode=0, seed=1))


def test_a_few_shot_run_reports_each_episode_and_their_mean(store, tmp_path):
    settings = ProbeSettings(store=str(store), head="knn", out=str(tmp_path), shots=(1, 5), episodes=3, **KNN)
    result = run_probe(settings)
    few = result.metrics["few_shot"]
    assert few["episodes"] == 3 and list(few["shots"]) == ["1", "5"]
    subsets = json.loads((result.run_dir / "few_shot_subsets.json").read_text())
    assert sorted(subsets) == ["1/0", "1/1", "1/2", "5/0", "5/1", "5/2"]
    labels = FeatureStore.open(str(store)).labels("train")
    fit = np.setdiff1d(np.arange(600), json.loads((result.run_dir / "validation_subset.json").read_text())["indices"])
    for name, rows in subsets.items():
        shots, episode = map(int, name.split("/"))
        np.testing.assert_array_equal(rows, few_shot_rows(labels, fit, shots=shots, episode=episode, seed=0))
    for shots in ("1", "5"):
        runs = few["shots"][shots]["runs"]
        assert [r["episode"] for r in runs] == [0, 1, 2] and all(r["fit_rows"] == 10 * int(shots) for r in runs)
        assert few["shots"][shots]["test_top1"]["mean"] == pytest.approx(np.mean([r["test_top1"] for r in runs]))
    assert few["shots"]["5"]["test_top1"]["mean"] > few["shots"]["1"]["test_top1"]["mean"]
    assert result.metrics["best"]["test_top1"] > few["shots"]["5"]["test_top1"]["mean"]  # the full train split


def test_more_shots_than_the_smallest_class_is_refused_before_anything_is_written(store, tmp_path):
    with pytest.raises(ProbeInputError, match=r"--shots 60 is more than the \d+ fit rows of class 'digit \d'") as error:
        run_probe(ProbeSettings(store=str(store), head="knn", out=str(tmp_path), shots=(1, 60), **KNN))
    assert not any(tmp_path.iterdir())
    most = int(str(error.value).split("give --shots ")[1].split()[0])  # the advice, taken at its word
    result = run_probe(ProbeSettings(store=str(store), head="knn", out=str(tmp_path), shots=(most,), episodes=1, **KNN))
    assert result.metrics["few_shot"]["shots"][str(most)]["runs"][0]["fit_rows"] == 10 * most


# -- seeds ------------------------------------------------------------------------------------------------
def test_seeds_retrain_the_chosen_configuration_and_report_mean_and_std(store, tmp_path):
    settings = ProbeSettings(
        store=str(store),
        head="logreg",
        out=str(tmp_path),
        Cs=(0.1, 1.0),
        seeds=(0, 1, 2),
        **{k: v for k, v in KNN.items() if k != "ks"},
    )
    result = run_probe(settings)
    seeds = result.metrics["seeds"]
    best = result.metrics["best"]
    assert seeds["configuration"] == {"key": best["key"], "C": best["C"]}
    assert [r["seed"] for r in seeds["runs"]] == [0, 1, 2]
    assert seeds["runs"][0]["test_top1"] == pytest.approx(best["test_top1"])  # seed 0 is the main run's seed
    assert len({r["test_top1"] for r in seeds["runs"]}) > 1  # other carved validation rows, other fits
    values = [r["test_top1"] for r in seeds["runs"]]
    assert seeds["test_top1"] == {
        "mean": pytest.approx(np.mean(values)),
        "std": pytest.approx(np.std(values, ddof=1)),
        "n": 3,
        "values": values,
    }
    # metrics.json is rebuilt from the result files alone (repeats.json holds the repeats)
    rendered = render_run(result.run_dir, tmp_path / "rendered")
    assert rendered == json.loads((result.run_dir / "metrics.json").read_text())


# -- one record for every engine ----------------------------------------------------------------------------
def test_the_record_is_the_same_from_probe_and_sweep_and_keeps_the_transfer_mark(store, tmp_path):
    options = dict(pools=(1, 2), ks=(1, 5), threads=1, memory_budget=2**30)  # auto: what memory is free just then
    serial = run_probe(ProbeSettings(store=str(store), head="knn", out=str(tmp_path / "probe"), **options))
    swept = run_sweep(
        [StoreRef("knn", str(store))],
        ["knn"],
        {**options, "out": str(tmp_path / "probe")},
        out=tmp_path / "sweep",
        nested=False,
        progress=False,
    ).runs["knn"]
    assert swept.run_dir == tmp_path / "sweep" / "knn"
    for name in ("configs.csv", "metrics.json", "validation_subset.json"):
        assert (swept.run_dir / name).read_bytes() == (serial.run_dir / name).read_bytes(), name
    mine, theirs = (json.loads((r.run_dir / "run.json").read_text()) for r in (swept, serial))
    assert mine["data_kind"] == theirs["data_kind"] == "dogs"
    assert set(mine) - set(theirs) == {"sweep"}

    def strip(record):
        return {k: v for k, v in record.items() if k not in ENGINE_FIELDS}

    mine["settings"]["out"] = theirs["settings"]["out"]  # where each was asked to write
    assert json.dumps(strip(mine), indent=2) == json.dumps(strip(theirs), indent=2)
    # the transfer table marks Stanford Dogs whichever engine made the results
    (tmp_path / "dogs" / "pretrained").mkdir(parents=True)
    (swept.run_dir).rename(tmp_path / "dogs" / "pretrained" / "knn")
    build_transfer({"dogs": tmp_path / "dogs"}, tmp_path / "table")
    assert "| dogs † |" in (tmp_path / "table" / "transfer.md").read_text()


# -- the command line -----------------------------------------------------------------------------------------
def test_probe_and_sweep_take_the_vote_seeds_and_shots(store, tmp_path):
    common = [
        "--head",
        "knn",
        "--blocks",
        "1",
        "--timesteps",
        "10",
        "--pool",
        "2",
        "--knn-k",
        "5,10",
        "--vote",
        "uniform",
        "--temperature",
        "0.5",
        "--seeds",
        "0,1",
        "--shots",
        "2",
        "--episodes",
        "2",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(main, ["probe", "--store", str(store), "--out", str(tmp_path / "p"), *common])
    assert result.exit_code == 0, result.output
    assert "(95% bootstrap intervals)" in result.output and "balanced" in result.output
    assert "seeds 0,1: test top-1" in result.output and "2-shot, 2 episodes: test top-1" in result.output
    record = json.loads((tmp_path / "p" / "knn" / "run.json").read_text())
    assert record["head_options"] == {"vote": "uniform", "temperature": 0.5}
    assert record["settings"]["seeds"] == [0, 1] and record["settings"]["shots"] == [2]
    saved = json.loads((tmp_path / "p" / "knn" / "heads" / "b1_t10_p2.json").read_text())
    assert saved["options"] == {"vote": "uniform", "temperature": 0.5}
    swept = CliRunner().invoke(main, ["sweep", "--store", f"s={store}", "--out", str(tmp_path / "s"), *common])
    assert swept.exit_code == 0, swept.output
    assert "seeds 0,1: test top-1" in swept.output
    for name in ("configs.csv", "metrics.json", "few_shot_subsets.json"):
        assert (tmp_path / "s" / "s" / "knn" / name).read_bytes() == (tmp_path / "p" / "knn" / name).read_bytes(), name

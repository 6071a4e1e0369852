"""`pipeline probe` and `pipeline report` through click, their value parsers, and the report module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.options import parse_byte_size, parse_float_list, parse_named
from stages.report import build_report, render_run

from helpers import digits_features, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    features, labels = digits_features(n_train=600)
    return write_store(
        tmp_path_factory.mktemp("cli") / "store.zarr", features, labels, pools=(1, 2), resolution={1: 8, 2: 8}
    )


@pytest.fixture(scope="module")
def noise_store(tmp_path_factory):
    """The same layout with features that carry no class information (a "random" baseline)."""
    features, labels = digits_features(n_train=600)
    rng = np.random.default_rng(0)
    noise = {
        key: {s: rng.normal(size=v.shape).astype(np.float32) for s, v in value.items()}
        for key, value in features.items()
    }
    return write_store(tmp_path_factory.mktemp("cli") / "noise.zarr", noise, labels, pools=(1, 2))


FAST = ["--epochs", "3", "--batch-size", "64", "--threads", "1"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e-3,0.01,0.1", (0.001, 0.01, 0.1)),
        (" 1 , 2 ", (1.0, 2.0)),
        ("0.5", (0.5,)),
    ],
)
def test_parse_float_list(text, expected):
    assert parse_float_list(text) == expected


@pytest.mark.parametrize("text", ["", ",", "a,1", "1e-3;0.1"])
def test_parse_float_list_rejects(text):
    with pytest.raises(ValueError):
        parse_float_list(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("auto", None),
        ("1024", 1024),
        ("2KB", 2048),
        ("512MB", 512 * 1024**2),
        ("8G", 8 * 1024**3),
        ("1.5gb", int(1.5 * 1024**3)),
        ("4 GiB", 4 * 1024**3),
    ],
)
def test_parse_byte_size(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0", "12 parsecs"])
def test_parse_byte_size_rejects(text):
    with pytest.raises(ValueError):
        parse_byte_size(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("results/", ("results", "results/")),
        ("results/pretrained", ("pretrained", "results/pretrained")),
        ("pixels=runs/raw", ("pixels", "runs/raw")),
    ],
)
def test_parse_named_path(text, expected):
    assert parse_named(text) == expected


def test_probe_command_runs_a_sweep_and_reports_the_choice(store, tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(store),
            "--head",
            "linear",
            "--blocks",
            "1-2",
            "--timesteps",
            "10,90",
            "--pool",
            "1,2",
            "--lr",
            "1e-3,1e-2",
            "--out",
            str(out),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "chosen on validation" in result.output
    record = json.loads((out / "linear" / "run.json").read_text())
    assert record["settings"]["lrs"] == [0.001, 0.01] and record["settings"]["epochs"] == 3
    assert len(record["combos"]) == 2 * 2 * 2
    assert record["settings"]["halving"] and record["halving"] == [{"after_epoch": 2, "keep": 1}]


def test_probe_command_without_halving_trains_every_learning_rate_to_the_end(store, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(store),
            "--head",
            "linear",
            "--blocks",
            "1",
            "--timesteps",
            "10",
            "--pool",
            "1",
            "--lr",
            "1e-3,1e-2",
            "--no-halving",
            "--out",
            str(tmp_path),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "linear" / "run.json").read_text())
    assert record["settings"]["halving"] is False and record["halving"] == []


def test_probe_command_fuses_blocks_and_timesteps_into_one_attention_head(store, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(store),
            "--head",
            "attention",
            "--blocks",
            "1,2",
            "--timesteps",
            "10,90",
            "--pool",
            "2",
            "--fuse",
            "--dim",
            "16",
            "--depth",
            "1",
            "--attention-heads",
            "2",
            "--out",
            str(tmp_path),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "attention_fused" / "metrics.json").read_text())
    assert metrics["best"]["key"] == "b1+2_t10+90_p2" and metrics["num_input_sets"] == 1
    config = json.loads((tmp_path / "attention_fused" / "heads" / "b1+2_t10+90_p2.json").read_text())
    assert [(r["block"], r["timestep"]) for r in config["reads"]] == [(1, 10), (1, 90), (2, 10), (2, 90)]


def test_probe_command_explains_what_the_store_lacks(store, tmp_path):
    result = CliRunner().invoke(
        main, ["probe", "--store", str(store), "--head", "logreg", "--blocks", "5", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "block(s) 5 not stored" in result.output and "block 2: timesteps [10, 90], pools [1, 2, " in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--pool", "1,x"], "comma list of integers"),
        (["--lr", "fast"], "comma list of numbers"),
        (["--memory-budget", "lots"], "is not a size"),
        (["--blocks", "9-3"], "runs backwards"),
    ],
)
def test_probe_command_rejects_malformed_values(store, tmp_path, args, fragment):
    result = CliRunner().invoke(
        main, ["probe", "--store", str(store), "--head", "linear", "--out", str(tmp_path), *args]
    )
    assert result.exit_code == 2 and fragment in result.output


def test_report_combines_named_result_sets(store, noise_store, tmp_path):
    runner = CliRunner()
    for name, source in (("pretrained", store), ("random_init", noise_store)):
        for head in ("linear", "knn"):
            result = runner.invoke(
                main,
                [
                    "probe",
                    "--store",
                    str(source),
                    "--head",
                    head,
                    "--pool",
                    "8",
                    "--lr",
                    "1e-2",
                    "--knn-k",
                    "5,10",
                    "--out",
                    str(tmp_path / name),
                    *FAST,
                ],
            )
            assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = runner.invoke(
        main,
        [
            "report",
            "--results",
            str(tmp_path / "pretrained"),
            "--results",
            f"random_init={tmp_path / 'random_init'}",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    best = json.loads((out / "best.json").read_text())
    assert set(metrics) == set(best) == {"linear", "knn"}
    for head in ("linear", "knn"):
        assert set(metrics[head]) == {"pretrained", "random_init"}
        assert metrics[head]["pretrained"] > 0.8 > 0.2 > metrics[head]["random_init"]
        assert {name: best[head][name]["test_top1"] for name in metrics[head]} == metrics[head]
        for name, chosen in best[head].items():  # the headline table it prints: accuracy, interval, configuration
            line = next(line for line in result.output.splitlines() if line.split()[:2] == [head, name])
            assert f"{100 * chosen['test_top1']:.1f}% [{100 * chosen['test_top1_low']:.1f}, " in line
            assert f"block {chosen['blocks']}, t={chosen['timesteps']}, pool {chosen['pool']}" in line
    assert f"the picture: {out / 'comparison.png'}" in result.output
    summary = (out / "summary.md").read_text()
    assert "| head | pretrained | random_init |" in summary
    assert (out / "comparison.png").stat().st_size > 0
    assert len(list((out / "heatmaps").glob("*.png"))) == 4
    header = (out / "configs.csv").read_text().splitlines()[0]
    assert header.startswith("result_set,run,head,key")
    duplicate = runner.invoke(
        main,
        [
            "report",
            "--results",
            f"a={tmp_path / 'pretrained'}",
            "--results",
            f"a={tmp_path / 'random_init'}",
            "--out",
            str(out),
        ],
    )
    assert duplicate.exit_code == 2 and "distinct names" in duplicate.output
    missing = runner.invoke(main, ["report", "--results", str(tmp_path / "nothing"), "--out", str(out)])
    assert missing.exit_code == 1 and "no probe results" in missing.output


def test_report_rebuilds_from_result_files_alone(store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["probe", "--store", str(store), "--head", "ridge", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    original = json.loads((tmp_path / "ridge" / "metrics.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "ridge", copy)
    for name in ("metrics.json", "summary.md", "heatmap_pool1.png", "heatmap_pool2.png", "predictions.npz"):
        (copy / name).unlink()
    shutil.rmtree(copy / "heads")
    store.rename(store.with_name("moved.zarr"))  # the store is not needed
    try:
        assert render_run(copy) == original
        assert (copy / "heatmap_pool2.png").exists() and "Chosen on validation" in (copy / "summary.md").read_text()
        assert build_report({"only": tmp_path / "ridge"}, tmp_path / "r")["ridge"]["only"] == original["best"]
    finally:
        store.with_name("moved.zarr").rename(store)


def test_probe_command_refuses_a_window_its_memory_budget_cannot_hold_and_runs_at_the_advised_one(
    store, tmp_path, monkeypatch
):
    import stages.probe.plan as probe_plan

    monkeypatch.setattr(probe_plan, "process_floor", lambda torch_head: 500 << 20)  # the process, before features
    args = [
        "probe",
        "--store",
        str(store),
        "--head",
        "linear",
        "--blocks",
        "1",
        "--timesteps",
        "10",
        "--pool",
        "1",
        "--data-mode",
        "stream",
        "--memory-budget",
        f"{(500 << 20) + 400_000}",
        "--out",
        str(tmp_path),
        *FAST,
    ]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    message = refused.output.strip()
    assert (
        len(message.splitlines()) == 1
        and "b1_t10_p1 needs " in message
        and "(a 65536-sample shuffle window)" in message
    )
    window = message.split("pass --shuffle-window ")[1].split()[0]
    budget = message.rsplit("--memory-budget ", 1)[1]
    assert parse_byte_size(budget) > (500 << 20) + 400_000
    for advice in (["--shuffle-window", window], ["--memory-budget", budget]):  # either one, run verbatim, fits
        done = CliRunner().invoke(main, [*args, *advice])
        assert done.exit_code == 0, done.output

"""Probes that reach a converged reference, and the evaluation protocols by name (stages.probe.protocols)."""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from cache import FeatureStore
from cache.errors import ConfigError
from pipeline.cli import main
from stages.probe.protocols import DINOV2_CS, DINOV2_LEARNING_RATES, PROTOCOLS, SUMMARY, protocol_settings
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings
from tests.test_probe_support import digits_features, write_store

CS = (0.01, 0.1, 1.0, 10.0, 100.0)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    features, labels = digits_features()
    return write_store(
        tmp_path_factory.mktemp("digits") / "store.zarr", features, labels, pools=(4,), resolution={1: 16, 2: 16}
    )


def tuned_reference(store: FeatureStore, run_dir: Path, key: str) -> float:
    """Test top-1 of scikit-learn's LogisticRegression, converged (tol 1e-10), C chosen from CS on the probe's own
    validation rows by the probe's rule (validation top-1, ties to the lower validation loss)."""
    block, timestep, pool = (int(part[1:]) for part in key.split("_"))
    val = np.array(json.loads((run_dir / "validation_subset.json").read_text())["indices"])
    y, y_test = store.labels("train"), store.labels("val")
    train, test = store.read("train", block, timestep, pool), store.read("val", block, timestep, pool)
    fit = np.setdiff1d(np.arange(len(train)), val)
    x = train.reshape(len(train), -1).astype(np.float64)
    mean, std = x[fit].mean(0), x[fit].std(0)
    std[std < 1e-6] = 1
    standard = (x - mean) / std
    best = None
    for C in CS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(standard[fit], y[fit])
        score = (
            model.score(standard[val], y[val]),
            -log_loss(y[val], model.predict_proba(standard[val]), labels=model.classes_),
        )
        if best is None or score > best[0]:
            best = (score, model)
    return best[1].score((test.reshape(len(test), -1) - mean) / std, y_test)


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_converged_heads_reach_a_converged_tuned_logistic_regression_on_digits(digits_store, tmp_path, head):
    """Every input set within 0.3 points of (or above) the converged reference with the same C grid, both heads
    by default (the linear head's default solver is the batched L-BFGS; the minibatch solver falls short:
    docs/probes.md)."""
    store = FeatureStore.open(digits_store)
    # the noisier timestep (hardest features; every input set: bench/converge.py)
    result = run_probe(
        ProbeSettings(store=str(digits_store), head=head, out=str(tmp_path), Cs=CS, timesteps=(90,), threads=1)
    )
    if head == "linear":
        assert result.record["settings"]["solver"] == "lbfgs" and result.record["halving"] == []
    chosen = [r for r in result.rows if r["selected"]]
    assert len(chosen) == 2
    gaps = {r["key"]: 100 * (r["test_top1"] - tuned_reference(store, result.run_dir, r["key"])) for r in chosen}
    assert all(gap >= -0.3 for gap in gaps.values()), gaps


def test_the_linear_heads_decay_grid_is_the_C_grid_on_the_fit_rows():
    settings = ProbeSettings(store="s.zarr", head="linear", Cs=(0.1, 10.0))  # the default solver
    assert settings.solver == "lbfgs" and settings.lrs == (1.0,)
    assert settings.hypers(n_fit=50) == [
        {"lr": 1.0, "weight_decay": 1 / (10.0 * 50), "C": 10.0},
        {"lr": 1.0, "weight_decay": 1 / (0.1 * 50), "C": 0.1},
    ]
    # minibatch settings keep the minibatch solver and the registry's learning-rate grid
    assert ProbeSettings(store="s.zarr", head="linear", epochs=5).solver == "minibatch"
    assert ProbeSettings(store="s.zarr", head="linear", data_mode="stream").solver == "minibatch"
    for given in (
        {"lrs": (0.01,)},
        {"optimizer": "sgd"},
        {"batch_size": 64},
        {"warmup": 0.0},
        {"halving": False},
        {"batchnorm": True},
        {"recipe": "diffssl"},
    ):
        assert ProbeSettings(store="s.zarr", head="linear", **given).solver == "minibatch", given
    assert ProbeSettings(store="s.zarr", head="mlp").solver == "minibatch"
    assert ProbeSettings(store="s.zarr", head="linear", solver="minibatch").lrs is None


# -- the protocol table -------------------------------------------------------------------------------
def test_dinov2_rows_are_dinov2s_published_settings():
    linear = protocol_settings("dinov2", "linear")
    assert DINOV2_LEARNING_RATES == (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
    assert linear["lrs"] == pytest.approx([lr * 128 / 256 for lr in DINOV2_LEARNING_RATES])  # scale_lr at batch 128
    assert (
        linear["optimizer"],
        linear["weight_decays"],
        linear["warmup"],
        linear["epochs"],
        linear["batch_size"],
        linear["halving"],
        linear["standardise"],
    ) == ("sgd", (0.0,), 0.0, 10, 128, False, False)
    assert protocol_settings("dinov2", "knn") == {
        "standardise": False,
        "ks": (10, 20, 100, 200),
        "vote": "softmax",
        "temperature": 0.07,
    }
    assert len(DINOV2_CS) == 45 and DINOV2_CS[0] == pytest.approx(1e-6) and DINOV2_CS[-1] == pytest.approx(1e5)
    np.testing.assert_allclose(np.diff(np.log10(DINOV2_CS)), 11 / 44)
    assert protocol_settings("dinov2", "logreg") == {"standardise": False, "Cs": DINOV2_CS, "refit": True}
    assert set(SUMMARY) == set(PROTOCOLS)


def test_a_protocol_fills_what_was_not_given():
    settings = ProbeSettings(store="s.zarr", head="linear", protocol="dinov2", epochs=3)
    assert settings.epochs == 3 and settings.optimizer == "sgd" and len(settings.lrs) == 13
    assert settings.solver == "minibatch" and settings.rungs(3) == [] and not settings.standardise
    logreg = ProbeSettings(store="s.zarr", head="logreg", protocol="dinov2")
    assert logreg.Cs == DINOV2_CS and not logreg.standardise
    assert ProbeSettings(store="s.zarr", head="ridge", protocol="dinov2").standardise  # no row: the project's


def test_protocol_diffssl_is_the_recipe():
    by_protocol = ProbeSettings(store="s.zarr", head="attention", protocol="diffssl")
    by_recipe = ProbeSettings(store="s.zarr", head="attention", recipe="diffssl")
    assert {f.name: getattr(by_protocol, f.name) for f in fields(ProbeSettings) if f.name != "protocol"} == {
        f.name: getattr(by_recipe, f.name) for f in fields(ProbeSettings) if f.name != "protocol"
    }
    default = ProbeSettings(store="s.zarr", head="linear", protocol="default")
    assert default == ProbeSettings(store="s.zarr", head="linear", protocol=None).__class__(
        **{
            **{f.name: getattr(ProbeSettings(store="s.zarr", head="linear"), f.name) for f in fields(ProbeSettings)},
            "protocol": "default",
        }
    )


def test_every_protocol_setting_is_a_probe_setting():
    names = {f.name for f in fields(ProbeSettings)}
    assert all(name in names for rows in PROTOCOLS.values() for row in rows.values() for name in row)


def test_dinov2_protocol_runs_knn_and_logreg_on_raw_features(digits_store, tmp_path):
    result = run_probe(
        ProbeSettings(
            store=str(digits_store),
            head="logreg",
            protocol="dinov2",
            out=str(tmp_path),
            blocks=(1,),
            timesteps=(10,),
            threads=1,
            Cs=DINOV2_CS[20:24],
        )
    )
    assert result.record["settings"]["protocol"] == "dinov2" and result.record["settings"]["standardise"] is False
    assert 0.5 < result.metrics["best"]["test_top1"] <= 1.0


# -- bad input --------------------------------------------------------------------------------------------
def test_an_unknown_protocol_is_a_one_line_error_listing_them(digits_store, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(digits_store),
            "--head",
            "knn",
            "--protocol",
            "dino",
            "--out",
            str(tmp_path / "results"),
        ],
    )
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "'protocol'" in message and "default, diffssl, dinov2" in message, message
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="one of default, diffssl, dinov2"):
        ProbeSettings(store="s.zarr", head="knn", protocol="DINOv2")


def test_lbfgs_with_settings_it_cannot_serve_is_an_error():
    with pytest.raises(ConfigError, match="'solver'"):
        ProbeSettings(store="s.zarr", head="mlp", solver="lbfgs")
    with pytest.raises(ConfigError, match="'solver'"):
        ProbeSettings(store="s.zarr", head="linear", solver="lbfgs", data_mode="stream")


def test_the_c_path_stops_past_each_input_sets_validation_peak(digits_store, tmp_path):
    """Along the default C grid (strongest first, blocks of 5) an input set stops 3 C values past its validation
    peak: the C values it trained are a prefix of the path, the rest are recorded untrained and never chosen."""
    result = run_probe(ProbeSettings(store=str(digits_store), head="linear", out=str(tmp_path), blocks=(2,), threads=1))
    assert result.record["settings"]["solver"] == "lbfgs"
    for key in {r["key"] for r in result.rows}:
        path = sorted((r for r in result.rows if r["key"] == key), key=lambda r: -r["weight_decay"])
        trained = [r["epochs"] == 1 for r in path]
        count = sum(trained)
        assert trained == [True] * count + [False] * (len(path) - count) and count % 5 == 0, key
        assert all(np.isnan(r["val_top1"]) and not r["selected"] for r in path[count:])
        chosen = next(i for i, r in enumerate(path) if r["selected"])
        assert count == len(path) or count - 1 - chosen >= 3, (key, chosen, count)


def test_dinov2_logreg_refits_the_chosen_C_on_fit_and_validation_rows():
    """DINOv2's log_regression.py: the C chosen on validation is fitted again on train + val before the test."""
    from sklearn.datasets import load_digits

    from stages.probe.sklearn_probes import LogRegProbe

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / np.where(X.std(0) > 1e-6, X.std(0), 1)
    fit, val, test = slice(0, 900), slice(900, 1200), slice(1200, None)
    plain = LogRegProbe(Cs=(0.01, 0.1, 1.0)).fit(X[fit], y[fit], X[val], y[val])
    refit = LogRegProbe(Cs=(0.01, 0.1, 1.0), refit=True).fit(X[fit], y[fit], X[val], y[val])
    assert refit.best_C_ == plain.best_C_  # the choice is made on the fit rows' path, as without refit
    np.testing.assert_array_equal(refit.decision_grid(X[val]), plain.decision_grid(X[val]))
    both = np.concatenate([np.arange(900), np.arange(900, 1200)])
    reference = LogisticRegression(C=refit.best_C_, tol=1e-10, max_iter=10000).fit(X[both], y[both])
    np.testing.assert_allclose(refit.coef_, reference.coef_, atol=1e-3 * np.abs(reference.coef_).max())
    assert np.mean(refit.predict(X[test]) == reference.predict(X[test])) >= 0.995
    assert not np.allclose(refit.coef_, plain.coef_)
    settings = ProbeSettings(store="s.zarr", head="logreg", protocol="dinov2")
    assert settings.refit and settings.head_options() == {"refit": True}
    assert not ProbeSettings(store="s.zarr", head="logreg").refit

"""`pipeline cka`: the estimators against a Gram-matrix reference written here, their invariants, streaming
against in-memory, the outputs, and bad input.

The reference is the textbook form: Gram matrices K = X X^T (or Gaussian), the centring matrix
H = I - 11^T/n, HSIC = tr(K H L H); the unbiased HSIC of Song et al. (2012) term by term with
explicit loops over the definition's sums where they are cheap; CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.distance import pdist, squareform

from cache import FeatureStore
from pipeline.cli import main
from pipeline.options import parse_named, parse_scoped
from stages.cka.run import COLUMNS, CkaSettings, run_cka, select_samples
from stages.cka.streaming import minibatches

from helpers import digest, write_store


# -- the reference: Gram form ---------------------------------------------------------------------------
def centring(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def hsic(K: np.ndarray, L: np.ndarray) -> np.ndarray:
    H = centring(len(K))
    return np.trace(K @ H @ L @ H)


def hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5: with K~, L~ the Gram matrices with zero diagonals."""
    n = len(K)
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return float(
        (
            np.trace(Kt @ Lt)
            + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
        )
        / (n * (n - 3))
    )


def linear_gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x @ x.T


def gaussian_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    distances = pdist(np.asarray(x, np.float64).reshape(len(x), -1))  # every distinct pair once
    bandwidth = sigma * np.median(distances)
    return np.exp(-(squareform(distances) ** 2) / (2 * bandwidth**2))


def reference(x: np.ndarray, y: np.ndarray, estimator: str, *, sigma: float = 1.0, batches=None) -> float:
    if estimator == "linear":
        K, L = linear_gram(x), linear_gram(y)
        return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
    if estimator == "rbf":
        K, L = gaussian_gram(x, sigma), gaussian_gram(y, sigma)
        return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
    if estimator == "debiased":
        batches = [np.arange(len(x))]
    kl = kk = ll = 0.0
    for rows in batches:
        K, L = linear_gram(x[rows]), linear_gram(y[rows])
        kl, kk, ll = kl + hsic_unbiased(K, L), kk + hsic_unbiased(K, K), ll + hsic_unbiased(L, L)
    return kl / np.sqrt(kk * ll)


# -- stores ---------------------------------------------------------------------------------------------
def related_features(seed=0, n=(40, 43), channels=5, grid=2, timesteps=(10, 90), mean=0.0):
    """Block 1: random; block 2: a nonlinear mix of block 1; block 3: another random one of other width."""
    rng = np.random.default_rng(seed)
    features, labels = {}, {}
    mix = rng.normal(size=(channels, channels))
    for split, count in zip(("train", "val"), n):
        labels[split] = np.arange(count) % 3
        for t in timesteps:
            x = rng.normal(size=(count, channels, grid, grid)) + mean
            features.setdefault((1, t), {})[split] = x.astype(np.float32)
            mixed = np.tanh(np.einsum("oc,nchw->nohw", mix, x - mean) / 2) + 0.3 * rng.normal(size=x.shape)
            features.setdefault((2, t), {})[split] = mixed.astype(np.float32)
            features.setdefault((3, t), {})[split] = (rng.normal(size=(count, 3, grid, grid)) + x[:, :3]).astype(
                np.float32
            )
    return features, labels


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cka")
    features, labels = related_features()
    other, _ = related_features(seed=1, timesteps=(0,))  # a model without noise: timestep 0 only
    return {
        "a": write_store(root / "a.zarr", features, labels, chunk_samples=7, pools=(1, 2)),
        "b": write_store(root / "b.zarr", other, labels, chunk_samples=16, pools=(1, 2)),
    }


@functools.cache
def _read(path: Path, block: int, timestep: int, pool: int, split: str) -> np.ndarray:
    x = FeatureStore.open(path).read(split, block, timestep, pool)
    return x.reshape(len(x), -1).astype(np.float64)


def read(path: Path, block: int, timestep: int, pool: int, split: str = "val") -> np.ndarray:
    return _read(path, block, timestep, pool, split).copy()


def run(tmp_path: Path, stores: dict, **settings):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    return run_cka(
        CkaSettings(
            stores=tuple((name, str(path)) for name, path in stores.items()),
            out=str(out),
            progress=False,
            heatmaps=False,
            **settings,
        )
    )


# -- the estimators against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["linear", "debiased", "rbf"])
def test_every_pair_matches_the_gram_reference(tmp_path, stores, estimator):
    result = run(tmp_path, stores, estimator=estimator, pools=(1, 2), rbf_sigma=0.8)
    assert len(result.rows) == 2 * (9 * 10 // 2)  # 6 + 3 features per pool, every pair i <= j
    for row in result.rows:
        x = read(stores[row["store_a"]], row["block_a"], row["timestep_a"], row["pool"])
        y = read(stores[row["store_b"]], row["block_b"], row["timestep_b"], row["pool"])
        assert row["cka"] == pytest.approx(reference(x, y, estimator, sigma=0.8), rel=1e-9, abs=1e-12), row


def test_minibatch_matches_the_reference_over_the_same_minibatches(tmp_path, stores):
    result = run(tmp_path, stores, estimator="minibatch", batch_size=8, seed=3)
    batches = minibatches(np.arange(43), 43, 8, 3)
    assert sorted(len(b) for b in batches) == [7, 7, 7, 7, 7, 8]
    assert sorted(np.concatenate(batches)) == list(range(43))
    for row in result.rows:
        x = read(stores[row["store_a"]], row["block_a"], row["timestep_a"], 1)
        y = read(stores[row["store_b"]], row["block_b"], row["timestep_b"], 1)
        assert row["cka"] == pytest.approx(reference(x, y, "minibatch", batches=batches), rel=1e-9), row


def test_minibatch_with_one_batch_of_all_samples_equals_debiased(tmp_path, stores):
    one = run(tmp_path, stores, estimator="minibatch", batch_size=43)
    debiased = run(tmp_path, stores, estimator="debiased")
    assert [r["cka"] for r in one.rows] == pytest.approx([r["cka"] for r in debiased.rows], rel=1e-10)
    linear = run(tmp_path, stores, estimator="linear")
    assert not np.allclose([r["cka"] for r in linear.rows], [r["cka"] for r in debiased.rows], atol=1e-3)


def test_minibatch_order_is_a_seeded_function_of_sample_index():
    rows = np.arange(0, 100, 3)
    a = minibatches(rows, 100, 8, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, minibatches(rows, 100, 8, seed=5)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, minibatches(rows, 100, 8, seed=6)))
    # a sample's place in the order does not depend on which others are selected
    fewer = minibatches(rows[rows != 9], 100, 8, seed=5)
    assert [s for s in np.concatenate(a) if s != 9] == list(np.concatenate(fewer))


# -- invariants ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformed(tmp_path_factory) -> Path:
    """Block 1: X; 2: X Q (Q orthogonal); 3: 3.7 X; 4: X + 5 (a shift); 5: unrelated. Timestep 0, 1x1 grid."""
    rng = np.random.default_rng(7)
    labels = {"train": np.arange(30) % 2, "val": np.arange(36) % 2}
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    features = {}
    for split, y in labels.items():
        x = rng.normal(size=(len(y), 12)) * np.linspace(0.5, 2, 12)  # anisotropic, so that Q matters
        for block, value in enumerate((x, x @ q, 3.7 * x, x + 5.0, rng.normal(size=x.shape)), start=1):
            features[(block, 0)] = {**features.get((block, 0), {}), split: value[:, :, None, None].astype(np.float64)}
    return write_store(tmp_path_factory.mktemp("inv") / "t.zarr", features, labels, chunk_samples=5)


@pytest.mark.parametrize("estimator", ["linear", "debiased", "minibatch", "rbf"])
def test_invariants(tmp_path, transformed, estimator):
    result = run(tmp_path, {"t": transformed}, estimator=estimator, batch_size=12)
    cka = {(r["block_a"], r["block_b"]): r["cka"] for r in result.rows}
    for block in range(1, 6):
        assert cka[(block, block)] == pytest.approx(1.0, abs=1e-12)  # CKA(X, X) = 1
    assert cka[(1, 2)] == pytest.approx(1.0, abs=1e-9)  # an orthogonal transform
    assert cka[(1, 3)] == pytest.approx(1.0, abs=1e-9)  # isotropic scaling
    assert cka[(1, 4)] == pytest.approx(1.0, abs=1e-9)  # a shift (the features are centred)
    assert cka[(2, 3)] == pytest.approx(1.0, abs=1e-9)
    assert abs(cka[(1, 5)]) < 0.6  # unrelated features are not aligned
    x = read(transformed, 1, 0, 1)
    assert reference(x, x @ np.diag(np.linspace(1, 3, 12)), "linear") < 0.999  # but an anisotropic scaling is seen


def test_symmetric_and_independent_of_store_order(tmp_path, stores):
    forward = run(tmp_path, stores, estimator="debiased")
    backward = run(tmp_path, dict(reversed(list(stores.items()))), estimator="debiased")

    def pairs(result):
        return {
            frozenset(
                [(r["store_a"], r["block_a"], r["timestep_a"]), (r["store_b"], r["block_b"], r["timestep_b"])]
            ): r["cka"]
            for r in result.rows
        }

    a, b = pairs(forward), pairs(backward)
    assert set(a) == set(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15)


# -- streaming ------------------------------------------------------------------------------------------
def in_memory_linear(x: np.ndarray, y: np.ndarray) -> float:
    """The straightforward NumPy computation: centre, ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("budget", [None, 60_000])
def test_streamed_equals_in_memory(tmp_path, stores, budget, caplog):
    # stores chunked by 7 and 16 samples; a small budget splits the features into groups: several passes
    with caplog.at_level("INFO", logger="stages.cka"):
        result = run(tmp_path, stores, pools=(2,), memory_budget=budget)
    assert ("passes over the samples" in caplog.text) == (budget is not None)
    for row in result.rows:
        x = read(stores[row["store_a"]], row["block_a"], row["timestep_a"], 2)
        y = read(stores[row["store_b"]], row["block_b"], row["timestep_b"], 2)
        assert row["cka"] == pytest.approx(in_memory_linear(x, y), rel=1e-12), row


def test_large_means_do_not_cancel(tmp_path):
    # The Gram form on the raw values is itself off by 1e-5 here (K's entries are 1e8 times its centred
    # ones); the reference is computed on features centred first, which CKA does not change.
    features, labels = related_features(mean=1e4, timesteps=(5,))
    store = write_store(tmp_path / "m.zarr", features, labels, chunk_samples=6)
    for estimator in ("linear", "debiased"):
        result = run(tmp_path, {"m": store}, estimator=estimator)
        for row in result.rows:
            x, y = read(store, row["block_a"], 5, 1), read(store, row["block_b"], 5, 1)
            expected = reference(x - x.mean(axis=0), y - y.mean(axis=0), estimator)
            assert row["cka"] == pytest.approx(expected, rel=1e-10), (estimator, row)


def test_minibatch_streams_in_several_passes_with_the_same_result(tmp_path, stores):
    whole = run(tmp_path, stores, estimator="minibatch", batch_size=8)
    passes = run(tmp_path, stores, estimator="minibatch", batch_size=8, memory_budget=30_000)
    assert [r["cka"] for r in passes.rows] == pytest.approx([r["cka"] for r in whole.rows], rel=1e-12)


def test_a_seeded_subset_of_samples(tmp_path, stores):
    result = run(tmp_path, stores, samples=20, seed=4, blocks=((None, (1, 2)),), timesteps=(("a", (90,)),))
    rows = select_samples(43, 20, 4)
    assert len(rows) == 20 and list(rows) == sorted(set(rows))
    assert result.record["samples"]["count"] == 20 and result.record["samples"]["of"] == 43
    assert {(r["store_a"], r["timestep_a"]) for r in result.rows} == {("a", 90), ("b", 0)}
    for row in result.rows:
        x = read(stores[row["store_a"]], row["block_a"], row["timestep_a"], 1)[rows]
        y = read(stores[row["store_b"]], row["block_b"], row["timestep_b"], 1)[rows]
        assert row["cka"] == pytest.approx(reference(x, y, "linear"), rel=1e-9)


# -- the command ----------------------------------------------------------------------------------------
def test_command_writes_the_long_table_settings_and_heatmaps(tmp_path, stores):
    out = tmp_path / "cka"
    args = ["cka", "--store", str(stores["a"]), "--store", f"other={stores['b']}", "--pool", "1,2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "90 pairs of 18 features" in result.output
    with open(out / "cka.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == 90
    assert {r["store_a"] for r in table} == {"a", "other"}  # the file stem, or the given name
    assert {r["split"] for r in table} == {"val"} and {r["samples"] for r in table} == {"43"}
    record = json.loads((out / "cka.json").read_text())
    assert record["stores"]["a"]["fingerprint"] == FeatureStore.open(stores["a"]).fingerprint
    assert record["stores"]["other"]["fingerprint"] == FeatureStore.open(stores["b"]).fingerprint
    assert record["settings"]["estimator"] == "linear" and record["samples"]["indices_sha256"]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == [
        "a_pool1.png",
        "a_pool2.png",
        "a_vs_other_pool1.png",
        "a_vs_other_pool2.png",
        "other_pool1.png",
        "other_pool2.png",
    ]
    assert (out / "heatmaps" / "a_pool1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(
        main, ["cka", "--store", str(stores["b"]), "--out", str(out)]
    )  # its own output: replaced
    assert again.exit_code == 0, again.output
    assert [p.name for p in (out / "heatmaps").iterdir()] == ["b_pool1.png"]
    (out / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(main, ["cka", "--store", str(stores["b"]), "--out", str(out)])
    assert refused.exit_code == 1 and "was not written by `pipeline cka`" in refused.output


@pytest.mark.parametrize(
    "text, expected",
    [
        ("features/adm256.zarr", ("adm256", "features/adm256.zarr")),
        ("adm=features/adm256.zarr", ("adm", "features/adm256.zarr")),
        ("features/r50/", ("r50", "features/r50/")),
    ],
)
def test_store_names(text, expected):
    assert parse_named(text, suffix=".zarr") == expected


@pytest.mark.parametrize(
    "text, expected", [("18-30", (None, "18-30")), ("adm=1,2", ("adm", "1,2")), (" r50 =all", ("r50", "all"))]
)
def test_scoped_selections(text, expected):
    assert parse_scoped(text, str) == expected


# -- bad input -------------------------------------------------------------------------------------------
def different_samples(tmp_path, stores):
    features, labels = related_features(n=(40, 42))
    return ["--store", str(stores["a"]), "--store", str(write_store(tmp_path / "c.zarr", features, labels))]


BAD = {
    "a block the store lacks": (
        lambda t, s: ["--store", str(s["a"]), "--blocks", "2,9"],
        1,
        "a ({}) has no block 9; it holds blocks 1, 2, 3",
    ),
    "a timestep the store lacks": (
        lambda t, s: ["--store", str(s["a"]), "--store", str(s["b"]), "--timesteps", "b=10"],
        1,
        "b ({}) has no timestep 10 for block(s) 1, 2, 3; it holds block 1: timesteps [0]",
    ),
    "a pool the store lacks": (
        lambda t, s: ["--store", str(s["a"]), "--pool", "3"],
        1,
        "cannot give pool 3 for block(s) 1, 2, 3; it can give block 1: pools [1, 2]",
    ),
    "a split the store lacks": (lambda t, s: ["--store", str(s["a"]), "--split", "test"], 1, "has no split 'test'"),
    "stores with different samples": (
        different_samples,
        1,
        "the stores hold different samples in split 'val' (a has 43 samples, c 42)",
    ),
    "debiased on 3 samples": (
        lambda t, s: ["--store", str(s["a"]), "--estimator", "debiased", "--samples", "3"],
        1,
        "needs at least 4 samples",
    ),
    "minibatches under 4 samples": (
        lambda t, s: ["--store", str(s["a"]), "--estimator", "minibatch", "--samples", "6", "--batch-size", "4"],
        1,
        "minibatches of as few as 3",
    ),
    "more samples than the split": (
        lambda t, s: ["--store", str(s["a"]), "--samples", "50"],
        1,
        "more than the split's 43 samples",
    ),
    "a selection naming no store": (
        lambda t, s: ["--store", str(s["a"]), "--blocks", "z=1"],
        1,
        "selections of the stores given (a)",
    ),
    "one store twice": (lambda t, s: ["--store", str(s["a"]), "--store", str(s["a"])], 1, "distinct names"),
    "a store that is not there": (lambda t, s: ["--store", str(t / "none.zarr")], 1, "no feature store"),
    "rbf over the budget": (
        lambda t, s: ["--store", str(s["a"]), "--estimator", "rbf", "--memory-budget", "100KB"],
        1,
        "choose --samples",
    ),
    "linear over the budget": (
        lambda t, s: ["--store", str(s["a"]), "--pool", "2", "--memory-budget", "2KB"],
        1,
        "Use --estimator minibatch",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_clear_line(tmp_path, stores, case):
    setup, code, fragment = BAD[case]
    args = setup(tmp_path, stores)
    before = {name: digest(path) for name, path in stores.items()}
    result = CliRunner().invoke(main, ["cka", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    path = {"a": stores["a"], "b": stores["b"]}
    assert fragment.format(path["b" if fragment.startswith("b (") else "a"]) in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()
    assert {name: digest(path) for name, path in stores.items()} == before

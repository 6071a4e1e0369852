"""`pipeline similarity`: each metric against its published definition recomputed here (N x N matrices,
loops where clearer), hand-worked cases, invariances, calibration, chunked against in-memory, the
outputs, and bad input.

The references follow the definitions of platonic-rep's `metrics.py` (Huh et al. 2024) and of the
papers it cites, written out here independently: kNN by sorting each row of X X^T with the diagonal
excluded; HSIC_1 as Song et al. (2012), eq. 5; SVCCA as Raghu et al. (2017): SVD-reduce, then CCA by
whitening the covariance blocks; Procrustes through scipy's orthogonal_procrustes.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes, sqrtm

from cache import FeatureStore
from stages.cka.streaming import minibatches
from stages.similarity import calibration
from stages.similarity.metrics import KNN_METRICS, METRICS, Parameters, Side, score
from stages.similarity.neighbours import nearest_neighbours
from stages.similarity.preprocess import clamp_value, preprocess
from stages.similarity.run import COLUMNS, SimilaritySettings, run_similarity
from stages.similarity.streamed import clamp_value_streamed, streamed_neighbours
from tests.test_cka import read, related_features
from tests.test_cka import reference as cka_reference

from helpers import write_store


# -- the references -------------------------------------------------------------------------------------
def ref_knn(x: np.ndarray, k: int) -> list[list[int]]:
    """Each sample's k nearest others by inner product, ties to the smaller index."""
    s = x @ x.T
    return [sorted((j for j in range(len(x)) if j != i), key=lambda j: (-s[i, j], j))[:k] for i in range(len(x))]


def ref_mutual(x, y, k):
    a, b = ref_knn(x, k), ref_knn(y, k)
    return np.mean([len(set(a[i]) & set(b[i])) / k for i in range(len(x))])


def ref_cycle(x, y, k):
    a, b = ref_knn(x, k), ref_knn(y, k)
    return np.mean([any(i in a[j] for j in b[i]) for i in range(len(x))])


def lcs(p, q):
    table = [[0] * (len(q) + 1) for _ in range(len(p) + 1)]
    for i in range(1, len(p) + 1):
        for j in range(1, len(q) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if p[i - 1] == q[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def levenshtein(p, q):
    table = [[i + j if i * j == 0 else 0 for j in range(len(q) + 1)] for i in range(len(p) + 1)]
    for i in range(1, len(p) + 1):
        for j in range(1, len(q) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (p[i - 1] != q[j - 1]))
    return table[-1][-1]


def ref_lcs(x, y, k):
    a, b = ref_knn(x, k), ref_knn(y, k)
    return np.mean([lcs(a[i], b[i]) for i in range(len(x))])  # platonic-rep: not divided by k


def ref_edit(x, y, k):
    a, b = ref_knn(x, k), ref_knn(y, k)
    return 1 - np.mean([levenshtein(a[i], b[i]) for i in range(len(x))]) / k


def hsic1(K, L):
    """Song et al. (2012), eq. 5, term by term."""
    n = len(K)
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    trace, totals, rows = np.sum(Kt * Lt.T), Kt.sum() * Lt.sum(), np.sum(Kt @ Lt)
    return (trace + totals / ((n - 1) * (n - 2)) - 2 * rows / (n - 2)) / (n * (n - 3))


def hsic_biased(K, L):
    H = np.eye(len(K)) - 1 / len(K)
    return np.trace(K @ H @ L @ H)


def ref_cknna(x, y, k):
    K, L = x @ x.T, y @ y.T
    n = len(x)

    def mask(knn):
        m = np.zeros((n, n))
        for i, row in enumerate(knn):
            m[i, row] = 1
        return m

    mk, ml = mask(ref_knn(x, k)), mask(ref_knn(y, k))
    kl, kk, ll = hsic1(mk * ml * K, mk * ml * L), hsic1(mk * K, mk * K), hsic1(ml * L, ml * L)
    return kl / (np.sqrt(kk * ll) + 1e-6)


def ref_cka(x, y, unbiased, eps):
    K, L = x @ x.T, y @ y.T
    f = hsic1 if unbiased else hsic_biased
    return f(K, L) / (np.sqrt(f(K, K) * f(L, L)) + eps)


def ref_svcca(x, y, d):
    """Raghu et al.: standardise, keep the top-d SVD directions (the data projected on them), then the
    canonical correlations: singular values of Sxx^-1/2 Sxy Syy^-1/2; their mean."""

    def reduce(a):
        a = (a - a.mean(0)) / (a.std(0, ddof=1) + 1e-8)
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        return a @ vt[:d].T

    p, q = reduce(x), reduce(y)
    sxx, syy, sxy = p.T @ p, q.T @ q, p.T @ q
    whitened = np.linalg.inv(np.real(sqrtm(sxx))) @ sxy @ np.linalg.inv(np.real(sqrtm(syy)))
    return np.mean(np.linalg.svd(whitened, compute_uv=False))


def ref_procrustes(x, y):
    """min over orthogonal R of ||X R - Y||_F^2, X, Y centred with unit norm (the narrower one padded with zeros)."""
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    width = max(x.shape[1], y.shape[1])
    x, y = (np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in (x, y))
    r, _ = orthogonal_procrustes(x, y)
    return np.linalg.norm(x @ r - y) ** 2


def ref_minibatch(x, y, batches):
    kl = kk = ll = 0.0
    for rows in batches:
        K, L = x[rows] @ x[rows].T, y[rows] @ y[rows].T
        kl, kk, ll = kl + hsic1(K, L), kk + hsic1(K, K), ll + hsic1(L, L)
    return kl / np.sqrt(kk * ll)


def reference(metric, x, y, *, k=5, d=4, batches=None):
    if metric in ("linear", "rbf"):
        return cka_reference(x, y, metric)
    return {
        "debiased": lambda: ref_cka(x, y, True, 0.0),
        "cka": lambda: ref_cka(x, y, False, 1e-6),
        "unbiased_cka": lambda: ref_cka(x, y, True, 1e-6),
        "minibatch": lambda: ref_minibatch(x, y, batches),
        "cknna": lambda: ref_cknna(x, y, k),
        "mutual_knn": lambda: ref_mutual(x, y, k),
        "cycle_knn": lambda: ref_cycle(x, y, k),
        "lcs_knn": lambda: ref_lcs(x, y, k),
        "edit_distance_knn": lambda: ref_edit(x, y, k),
        "svcca": lambda: ref_svcca(x, y, d),
        "procrustes": lambda: ref_procrustes(x, y),
    }[metric]()


def pair(seed=0, n=47, p=12, q=8):
    """X random; Y a noisy nonlinear function of X (related, not equal)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * np.linspace(0.5, 2, p)
    y = np.tanh(x @ rng.normal(size=(p, q)) / 2) + 0.4 * rng.normal(size=(n, q))
    return x, y


def params(k=5, d=4, n=47, budget=1 << 26, grams=False):
    return Parameters(topk=k, cca_dim=d, batches=(np.arange(0, n, 2), np.arange(1, n, 2)), budget=budget, grams=grams)


def sides(x, y, how="clamp-l2", **kw):
    p = params(n=len(x), **kw)
    return Side(preprocess(x, how), p), Side(preprocess(y, how), p)


# -- every metric against its definition ------------------------------------------------------------------
@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("how", ["clamp-l2", "none"])
@pytest.mark.parametrize("grams", [False, True], ids=["moments", "grams"])
def test_every_metric_matches_its_definition(metric, how, grams):
    x, y = pair()
    a, b = sides(x, y, how, grams=grams)  # grams: the CKA metrics from N x N Gram matrices, not cross moments
    # rbf: `pipeline cka`'s Gram (kept bit for bit) takes squared distances as |x|^2 + |y|^2 - 2 x.y, which
    # loses digits on close L2-normalised rows against scipy's pdist: agreement to 1e-9, as in test_cka
    rel = 1e-9 if metric == "rbf" else 1e-10
    expected = reference(metric, a.x, b.x, batches=a.params.batches)
    assert score(metric, a, b) == pytest.approx(expected, rel=rel, abs=1e-13)
    assert score(metric, b, a) == pytest.approx(
        reference(metric, b.x, a.x, batches=a.params.batches), rel=rel, abs=1e-13
    )


def test_svcca_agrees_with_scikit_learn_cca_as_platonic_rep_computes_it():
    # platonic-rep: randomised SVD (torch.svd_lowrank), sklearn's iterative CCA, the mean correlation of the
    # canonical variates. With the exact SVD the iterative CCA converges to the same correlations.
    from sklearn.cross_decomposition import CCA

    x, y = pair(n=200)
    a, b = sides(x, y, "l2")
    u = [s.basis for s in (a, b)]
    cca = CCA(n_components=4, max_iter=5000, tol=1e-12).fit(*u)
    ua, ub = cca.transform(*u)
    sklearn_value = np.mean([np.corrcoef(ua[:, i], ub[:, i])[0, 1] for i in range(4)])
    assert score("svcca", a, b) == pytest.approx(sklearn_value, rel=1e-6)


def test_preprocessing_is_platonic_reps():
    rng = np.random.default_rng(1)
    x = rng.standard_t(2, size=(30, 7))  # heavy tails: the clamp matters
    flat = np.sort(np.abs(x).ravel())
    q = flat[int(0.95 * flat.size)]  # the exact form: the element at int(q * numel), no interpolation
    assert clamp_value(x) == q
    clamped = np.clip(x, -q, q)
    expected = clamped / np.linalg.norm(clamped, axis=1, keepdims=True)
    assert np.array_equal(preprocess(x, "clamp-l2"), expected)
    assert np.allclose(np.linalg.norm(preprocess(x, "l2"), axis=1), 1)
    assert np.array_equal(preprocess(x, "none"), x)


# -- hand-worked cases --------------------------------------------------------------------------------------
def test_a_hand_worked_example():
    # Four points on a line: by inner product, 3's nearest other is 2, ... (1-D features, k = 1)
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    nb = nearest_neighbours(x, 1, budget=1 << 20)
    assert nb.indices[:, 0].tolist() == [3, 3, 3, 2]  # the largest product with the others; 3's own is excluded
    y = np.array([[4.0], [3.0], [2.0], [1.0]])  # reversed: 0's nearest is 1, and so on
    p = Parameters(topk=1)
    a, b = Side(x, p), Side(y, p)
    assert Side(y, p).neighbours.indices[:, 0].tolist() == [1, 0, 0, 0]
    assert score("mutual_knn", a, b) == 0.0  # no sample has the same neighbour in both
    # cycle: i -> its b-neighbour j -> j's a-neighbour; back at i? 0->1->3 no; 1->0->3 no; 2->0->3 no; 3->0->3 yes
    assert score("cycle_knn", a, b) == 0.25
    assert score("lcs_knn", a, b) == 0.0 and score("edit_distance_knn", a, b) == 0.0


def test_sequence_scores_by_hand():
    from stages.similarity.neighbours import edit_distances, lcs_lengths

    a = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    b = np.array([[1, 2, 3, 4], [2, 1, 4, 3], [8, 7, 6, 5]])
    assert lcs_lengths(a, b).tolist() == [4, 2, 1]
    # 2143 from 1234: delete 1 (234), 3 -> 1 (214), insert 3 (2143): 3 edits; 8765 from 5678: 4 substitutions
    assert edit_distances(a, b).tolist() == [0, 3, 4]


@pytest.mark.parametrize("how", ["clamp-l2", "l2", "none"])
def test_identical_features_score_the_maximum(how):
    x, _ = pair()
    a, b = sides(x, x.copy(), how)
    for name, metric in METRICS.items():
        if name == "cycle_knn":
            # not 1 in general: i comes back only if it is among its own neighbours' neighbours (kNN is not
            # symmetric), so cycle_knn(X, X) is the share of samples with a reciprocal neighbour
            knn = ref_knn(a.x, 5)
            expected = np.mean([any(i in knn[j] for j in knn[i]) for i in range(len(knn))])
            assert score(name, a, b) == expected
            continue
        # platonic-rep's + 1e-6 in the denominators of cka, unbiased_cka and cknna keeps them just under 1
        tolerance = 1e-3 if name in ("cka", "unbiased_cka", "cknna") else 1e-12
        assert score(name, a, b) == pytest.approx(metric.top(5), abs=tolerance), name


def test_a_permutation_of_the_samples_is_near_chance():
    x, _ = pair(n=300)
    perm = np.random.default_rng(3).permutation(300)
    a, b = sides(x, x[perm], "l2", k=10)
    chance = 10 / 299  # two random neighbour sets of k among N - 1 share k^2 / (N - 1) on average
    assert abs(score("mutual_knn", a, b) - chance) < 0.03
    assert score("cknna", a, b) < 0.1 and score("edit_distance_knn", a, b) < 0.1
    assert score("lcs_knn", a, b) < 0.5  # of 10


def test_k_must_be_less_than_n():
    with pytest.raises(ValueError, match=r"k must be in \[1, N - 1\] = \[1, 3\], got 4"):
        nearest_neighbours(np.eye(4), 4, budget=1 << 20)


# -- invariances --------------------------------------------------------------------------------------------
# (metric, preprocess) -> the transforms the metric does not see. kNN metrics by inner product see neither an
# orthogonal map nor a positive scale; the clamp (elementwise) is not rotation invariant; SVCCA standardises
# each column, so it ignores any column scaling, not rotations in general... except that CCA is invariant to
# any invertible map of the reduced space: orthogonal maps keep the top-d subspace.
INVARIANT = {
    "linear": {"orthogonal", "scale", "shift"},
    "debiased": {"orthogonal", "scale", "shift"},
    "minibatch": {"orthogonal", "scale", "shift"},
    "rbf": {"orthogonal", "scale", "shift"},
    "cka": {"orthogonal", "shift"},
    "unbiased_cka": {"orthogonal", "shift"},  # + 1e-6: not exactly scale
    "cknna": {"orthogonal"},
    "mutual_knn": {"orthogonal", "scale"},
    "cycle_knn": {"orthogonal", "scale"},
    "lcs_knn": {"orthogonal", "scale"},
    "edit_distance_knn": {"orthogonal", "scale"},
    "svcca": {"scale", "shift", "anisotropic"},
    "procrustes": {"orthogonal", "scale", "shift"},
}


@pytest.mark.parametrize("metric", list(METRICS))
def test_invariances_each_metric_claims_and_those_it_does_not(metric):
    x, y = pair(seed=2, n=60, p=8, q=8)
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    transforms = {"orthogonal": x @ q, "scale": 3.7 * x, "shift": x + 2.0, "anisotropic": x * np.linspace(0.2, 5, 8)}
    p = params(n=60)
    base = score(metric, Side(x, p), Side(y, p))
    for name, moved in transforms.items():
        value = score(metric, Side(moved, p), Side(y, p))
        if name in INVARIANT[metric]:
            # svcca: the + 1e-8 on each column's deviation moves the score by ~1e-9 under a scaling
            assert value == pytest.approx(base, rel=1e-7 if metric == "svcca" else 1e-9, abs=1e-12), name
        elif metric not in ("cka", "unbiased_cka", "cknna") or name != "scale":  # + 1e-6: scale moves them ~1e-7
            assert value != pytest.approx(base, rel=1e-6, abs=1e-9), name


def test_clamp_breaks_rotation_invariance_that_l2_keeps():
    x, y = pair(seed=5)
    q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(12, 12)))
    for how, same in (("l2", True), ("clamp-l2", False)):
        a, b = sides(x, y, how)
        c, _ = sides(x @ q, y, how)
        assert (score("mutual_knn", c, b) == score("mutual_knn", a, b)) == same
        assert (score("cknna", c, b) == pytest.approx(score("cknna", a, b), rel=1e-9)) == same


# -- chunked = in-memory --------------------------------------------------------------------------------------
def test_chunked_neighbours_equal_one_block():
    x, _ = pair(n=97)
    whole = nearest_neighbours(x, 7, budget=1 << 30)
    rows = nearest_neighbours(x, 7, budget=1)  # one row per block
    some = nearest_neighbours(x, 7, budget=17 * 97 * 10)  # ten rows per block
    for other in (rows, some):
        assert np.array_equal(other.indices, whole.indices)
        # the matrix products of blocks of other shapes round differently in the last bit
        np.testing.assert_allclose(other.similarities, whole.similarities, rtol=1e-14)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    assert np.array_equal(whole.indices, np.argsort(-s, axis=1, kind="stable")[:, :7])  # the N x N form


def test_ties_go_to_the_smaller_index_in_any_block_size():
    x = np.repeat(np.eye(3), 4, axis=0)  # four copies of each of three points: ties everywhere
    for budget in (1, 1 << 20):
        nb = nearest_neighbours(x, 3, budget=budget)
        assert nb.indices[0].tolist() == [1, 2, 3] and nb.indices[5].tolist() == [4, 6, 7]


def test_bootstrap_copies_are_not_neighbours():
    x = np.random.default_rng(0).normal(size=(10, 3))
    rows = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6])
    nb = Side(x, Parameters(topk=3)).resampled(rows).neighbours
    assert all(rows[j] != rows[i] for i in range(10) for j in nb.indices[i])


@pytest.mark.parametrize("grams", [False, True], ids=["moments", "grams"])
def test_permuted_side_equals_recomputed(grams):
    x, y = pair()
    a, b = sides(x, y, grams=grams)
    for m in METRICS:  # derive everything first, so permuted() reorders the cached quantities
        score(m, a, b)
    perm = np.random.default_rng(9).permutation(len(x))
    fresh = Side(b.x[perm], b.params)
    for m in METRICS:
        assert score(m, a, b.permuted(perm)) == pytest.approx(score(m, a, fresh), rel=1e-10, abs=1e-13), m


# -- calibration ---------------------------------------------------------------------------------------------
def test_p_value_and_level():
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert calibration.p_value(0.35, null) == pytest.approx(2 / 5)
    assert calibration.p_value(0.5, null) == pytest.approx(1 / 5)  # never 0
    assert calibration.p_value(0.05, null, higher=False) == pytest.approx(1 / 5)
    assert calibration.null_level(np.arange(101.0)) == pytest.approx(95.0)


# -- the stage on stores ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity")
    features, labels = related_features(n=(40, 43), timesteps=(10, 90))
    other, _ = related_features(seed=1, n=(40, 43), timesteps=(0,))
    return {
        "a": write_store(root / "a.zarr", features, labels, chunk_samples=7, pools=(1, 2)),
        "b": write_store(root / "b.zarr", other, labels, chunk_samples=16, pools=(1, 2)),
    }


def run(tmp_path, stores, **settings):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    return run_similarity(
        SimilaritySettings(
            stores=tuple((n, str(p)) for n, p in stores.items()),
            out=str(out),
            progress=False,
            heatmaps=False,
            **settings,
        )
    )


def test_every_row_matches_the_definition_on_the_stored_features(tmp_path, stores):
    metrics = tuple(METRICS)
    result = run(tmp_path, stores, metrics=metrics, topk=4, cca_dim=3, batch_size=20, pools=(2,))
    batches = [np.searchsorted(np.arange(43), b) for b in minibatches(np.arange(43), 43, 20, 0)]
    assert len(result.rows) == (len(metrics) - 1) * 45 + 81  # 9 features: i <= j, and every ordered pair of cycle
    for row in result.rows:
        x = preprocess(read(stores[row["store_a"]], row["block_a"], row["timestep_a"], 2), "clamp-l2")
        y = preprocess(read(stores[row["store_b"]], row["block_b"], row["timestep_b"], 2), "clamp-l2")
        expected = reference(row["metric"], x, y, k=4, d=3, batches=batches)
        rel = 1e-9 if row["metric"] == "rbf" else 1e-10  # see test_every_metric_matches_its_definition
        assert row["score"] == pytest.approx(expected, rel=rel, abs=1e-13), row


def test_cka_metrics_without_preprocessing_equal_pipeline_cka(tmp_path, stores):
    from stages.cka.run import CkaSettings, run_cka

    result = run(tmp_path, stores, metrics=("linear", "debiased"), preprocess="none")
    for estimator in ("linear", "debiased"):
        cka = run_cka(
            CkaSettings(
                stores=tuple((n, str(p)) for n, p in stores.items()),
                estimator=estimator,
                out=str(tmp_path / f"cka_{estimator}"),
                progress=False,
                heatmaps=False,
            )
        )
        mine = [r["score"] for r in result.rows if r["metric"] == estimator]
        assert mine == pytest.approx([r["cka"] for r in cka.rows], rel=1e-10)


def test_small_budget_gives_the_same_numbers(tmp_path, stores):
    metrics = ("mutual_knn", "cknna", "lcs_knn")
    whole = run(tmp_path, stores, metrics=metrics)
    small = run(tmp_path, stores, metrics=metrics, memory_budget=200_000)  # neighbour search a few rows at a time
    assert [r["score"] for r in small.rows] == pytest.approx([r["score"] for r in whole.rows], rel=1e-12)


# -- streamed from the store: features that do not fit the budget ------------------------------------------
def _windows(x, size):
    """`streamed_neighbours`' reader over an in-memory array: the rows at `positions`, `size` at a time."""

    def windows(positions):
        for lo in range(0, len(positions), size):
            yield x[positions[lo : lo + size]]

    return windows


def test_streamed_clamp_is_the_exact_quantile():
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float16):
        x = rng.standard_t(2, size=(301, 13)).astype(dtype)  # heavy tails, many equal float16 values
        for size in (1, 17, 1000):
            assert clamp_value_streamed(_windows(x, size), len(x)) == clamp_value(x.astype(np.float64))


@pytest.mark.parametrize("how", ["clamp-l2", "l2", "none"])
def test_streamed_neighbours_equal_the_in_memory_search(how):
    rng = np.random.default_rng(4)
    x = rng.standard_t(3, size=(211, 9)).astype(np.float32)
    x[50] = x[7]  # a tie: the smaller index first, whatever the blocks
    whole = nearest_neighbours(preprocess(x, how), 6, budget=1 << 30)
    for budget, size in ((1, 5), (30_000, 64), (1 << 30, 211)):  # one row per block; a few; everything at once
        found, plan = streamed_neighbours(_windows(x, size), len(x), 6, how=how, budget=budget, width=9, window=size)
        assert np.array_equal(found.indices, whole.indices), budget
        assert found.similarities == pytest.approx(whole.similarities, rel=1e-12, abs=1e-15)
        assert plan.passes == -(-len(x) // plan.rows) and (plan.passes > 1) == (budget < 1 << 30)


def test_streamed_search_memory_is_bounded_by_the_budget_not_by_n():
    import tracemalloc

    rng = np.random.default_rng(5)
    n, width, k, window = 1500, 200, 5, 100
    x = rng.normal(size=(n, width)).astype(np.float32)
    budget = 600_000  # the prepared array alone would take 8 n width = 2.4 MB
    tracemalloc.start()
    try:
        found, plan = streamed_neighbours(
            _windows(x, window), n, k, how="clamp-l2", budget=budget, width=width, window=window
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.passes > 1 and plan.peak <= budget
    assert peak < 1.5 * budget < 8 * n * width  # what it holds, besides the lists (120 KB) it returns
    assert np.array_equal(found.indices, nearest_neighbours(preprocess(x, "clamp-l2"), k, budget=1 << 30).indices)


def test_a_run_beyond_the_budget_streams_the_knn_metrics_and_gives_the_same_numbers(tmp_path, stores):
    kw = {"metrics": KNN_METRICS, "permutations": 5, "topk": 4, "pools": (2,)}
    whole = run(tmp_path, stores, **kw)
    assert whole.record["streamed"] == {}
    small = run(tmp_path, stores, memory_budget=80_000, **kw)  # the 9 features' arrays do not fit; their lists do
    plans = small.record["streamed"][2]
    assert len(plans) == 9 and all(p["passes"] > 1 for p in plans.values())
    for mine, theirs in zip(small.rows, whole.rows, strict=True):
        for column in ("score", "null_mean", "null_q95", "p_value"):
            assert mine[column] == pytest.approx(theirs[column], rel=1e-10, abs=1e-13), (column, mine)


def test_metrics_that_need_the_features_are_refused_beyond_the_budget(tmp_path, stores):
    from stages.similarity.run import SimilarityInputError

    for extra, why in (
        ({"metrics": ("mutual_knn", "svcca")}, "svcca needs every compared array in memory"),
        ({"metrics": ("mutual_knn",), "bootstrap": 5}, "--bootstrap repeats the neighbour search"),
    ):
        with pytest.raises(SimilarityInputError, match=why) as error:
            run(tmp_path, stores, memory_budget=80_000, topk=4, pools=(2,), **extra)
        assert "\n" not in str(error.value) and "choose --memory-budget" in str(error.value)
        advised = str(error.value).split("choose --memory-budget ")[1].split(" ")[0]
        from pipeline.options import parse_byte_size

        run(tmp_path, stores, memory_budget=parse_byte_size(advised), topk=4, pools=(2,), **extra)  # the advice fits


def test_permutations_and_bootstrap_are_seeded_and_reproducible(tmp_path, stores):
    kw = {
        "metrics": ("mutual_knn", "linear"),
        "permutations": 19,
        "bootstrap": 10,
        "blocks": ((None, (1, 2)),),
        "timesteps": (("a", (10,)),),
        "seed": 3,
    }
    first, again = run(tmp_path, stores, **kw), run(tmp_path, stores, **kw)
    other = run(tmp_path, stores, **{**kw, "seed": 4})
    assert first.rows == again.rows
    assert [r["p_value"] for r in first.rows] != [r["p_value"] for r in other.rows]
    for row in first.rows:
        assert 1 / 20 <= row["p_value"] <= 1 and row["ci_low"] <= row["ci_high"]
    same = [r for r in first.rows if (r["store_a"], r["block_a"]) == (r["store_b"], r["block_b"])]
    assert all(r["p_value"] == pytest.approx(1 / 20) for r in same)  # a feature against itself beats every shuffle
    # the null recomputed here from the recorded seed
    x = preprocess(read(stores["a"], 1, 10, 1), "clamp-l2")
    y = preprocess(read(stores["a"], 2, 10, 1), "clamp-l2")
    null = [ref_mutual(x, y[perm], 10) for perm in calibration.permutations(43, 19, 3)]
    row = next(
        r
        for r in first.rows
        if r["metric"] == "mutual_knn" and (r["store_a"], r["block_a"], r["store_b"], r["block_b"]) == ("a", 1, "a", 2)
    )
    assert row["null_mean"] == pytest.approx(np.mean(null), rel=1e-12)
    assert row["null_q95"] == pytest.approx(np.percentile(null, 95), rel=1e-12)
    assert row["p_value"] == pytest.approx((np.sum(np.array(null) >= row["score"]) + 1) / 20)


def test_outputs(tmp_path, stores):
    out = tmp_path / "sim"
    result = run_similarity(
        SimilaritySettings(
            stores=(("a", str(stores["a"])), ("b", str(stores["b"]))),
            out=str(out),
            metrics=("mutual_knn", "procrustes"),
            permutations=5,
            best_pair=True,
            progress=False,
        )
    )
    with open(out / "similarity.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == 2 * 45  # 6 + 3 features: 45 pairs i <= j
    record = json.loads((out / "similarity.json").read_text())
    assert record["command"] == "similarity" and record["settings"]["topk"] == 10
    assert record["stores"]["a"]["fingerprint"] == FeatureStore.open(stores["a"]).fingerprint
    assert {(b["store_a"], b["store_b"], b["metric"]) for b in result.best} == {
        ("a", "b", "mutual_knn"),
        ("a", "b", "procrustes"),
    }
    for best in result.best:
        scores = [r["score"] for r in result.rows if r["metric"] == best["metric"] and r["store_a"] != r["store_b"]]
        assert best["score"] == (max(scores) if best["metric"] == "mutual_knn" else min(scores))
    names = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert "mutual_knn_a_vs_b_pool1.png" in names and "procrustes_calibrated_b_pool1.png" in names
    assert len(names) == 2 * 2 * 3


# -- the command ----------------------------------------------------------------------------------------
def test_command_writes_table_record_and_heatmaps(tmp_path, stores):
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "sim"
    args = [
        "similarity",
        "--store",
        str(stores["a"]),
        "--store",
        f"other={stores['b']}",
        "--metric",
        "cka,cknna,mutual_knn",
        "--timesteps",
        "a=10",
        "--topk",
        "5",
        "--permutations",
        "9",
        "--bootstrap",
        "5",
        "--best-pair",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "63 scores (cka, cknna, mutual_knn) of 6 features" in result.output
    with open(out / "similarity.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * 21 and {r["metric"] for r in table} == {"cka", "cknna", "mutual_knn"}
    assert all(r["p_value"] and r["ci_low"] for r in table)
    with open(out / "best_pairs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    again = CliRunner().invoke(main, ["similarity", "--store", str(stores["b"]), "--out", str(out)])
    assert again.exit_code == 0, again.output  # its own earlier output: replaced
    assert not (out / "best_pairs.csv").exists()


def different_samples(tmp_path, stores):
    features, labels = related_features(n=(40, 42))
    return ["--store", str(stores["a"]), "--store", str(write_store(tmp_path / "c.zarr", features, labels))]


BAD = {
    "an unknown metric": (
        lambda t, s: ["--store", str(s["a"]), "--metric", "mutual_knn,cosine"],
        (
            "unknown --metric cosine; choose from linear, debiased, minibatch, rbf, cka, unbiased_cka, "
            "cknna, mutual_knn, cycle_knn, lcs_knn, edit_distance_knn, svcca, procrustes"
        ),
    ),
    "--topk 0": (
        lambda t, s: ["--store", str(s["a"]), "--topk", "0"],
        "--topk must be an integer of at least 1; got 0",
    ),
    "--topk of N": (
        lambda t, s: ["--store", str(s["a"]), "--topk", "43"],
        (
            "--topk 43 needs more than 43 samples and split 'val' gives 43: a sample has 42 others; choose "
            "--topk 42 or fewer"
        ),
    ),
    "--topk over a subset": (lambda t, s: ["--store", str(s["a"]), "--samples", "8"], "choose --topk 7 or fewer"),
    "--permutations 0": (
        lambda t, s: ["--store", str(s["a"]), "--permutations", "0"],
        "--permutations must be an integer of at least 1 (leave it out for none); got 0",
    ),
    "--bootstrap 1": (
        lambda t, s: ["--store", str(s["a"]), "--bootstrap", "1"],
        "--bootstrap must be an integer of at least 2",
    ),
    "cknna with k = 1": (lambda t, s: ["--store", str(s["a"]), "--topk", "1"], "cknna needs --topk 2 or more"),
    "an unknown preprocessing": (
        lambda t, s: ["--store", str(s["a"]), "--preprocess", "zscore"],
        "unknown --preprocess 'zscore'; choose from clamp-l2, l2, none",
    ),
    "--cca-dim over the width": (
        lambda t, s: ["--store", str(s["a"]), "--metric", "svcca"],
        (
            "--cca-dim 10 is more than the 3 singular vectors a b3 t10 p1 has (3 features, "
            "43 samples); "
            "choose --cca-dim 3 or fewer"
        ),
    ),
    "stores with different samples": (
        different_samples,
        ("the stores hold different samples in split 'val' (a has 43 samples, c 42)"),
    ),
    "a block the store lacks": (lambda t, s: ["--store", str(s["a"]), "--blocks", "2,9"], "has no block 9"),
    "over the memory budget": (
        lambda t, s: ["--store", str(s["a"]), "--memory-budget", "10KB"],
        "more than 3/4 of the memory budget (10.0 KB); choose --memory-budget 68KB",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_clear_line(tmp_path, stores, case):
    from click.testing import CliRunner

    from pipeline.cli import main
    from tests.test_bad_input import digest

    setup, fragment = BAD[case]
    before = {name: digest(path) for name, path in stores.items()}
    result = CliRunner().invoke(main, ["similarity", *setup(tmp_path, stores), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert fragment in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()
    assert {name: digest(path) for name, path in stores.items()} == before


@pytest.mark.parametrize(
    "fix", [["--samples", "8", "--topk", "7"], ["--memory-budget", "68KB"], ["--metric", "svcca", "--cca-dim", "3"]]
)
def test_the_suggested_fixes_run(tmp_path, stores, fix):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["similarity", "--store", str(stores["a"]), *fix, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_all_metrics():
    settings = SimilaritySettings(stores=(("a", "a.zarr"),), out="x", metrics=("all",))
    assert settings.metrics == tuple(METRICS)


def test_a_store_read_at_its_own_pool(tmp_path, stores):
    # b at pool 2 (its 2x2 grid: 20 or 12 features) against a's features at pool 1
    result = run(tmp_path, stores, metrics=("mutual_knn", "linear"), store_pools=(("b", 2),), topk=4)
    widths = {(f["store"], f["block"]): (f["pool"], f["width"]) for f in result.record["features"][1]}
    assert widths[("a", 1)] == (1, 5) and widths[("b", 1)] == (2, 20) and widths[("b", 3)] == (2, 12)
    for row in result.rows:
        pa, pb = (2 if row["store_a"] == "b" else 1), (2 if row["store_b"] == "b" else 1)
        x = preprocess(read(stores[row["store_a"]], row["block_a"], row["timestep_a"], pa), "clamp-l2")
        y = preprocess(read(stores[row["store_b"]], row["block_b"], row["timestep_b"], pb), "clamp-l2")
        assert row["score"] == pytest.approx(reference(row["metric"], x, y, k=4), rel=1e-10, abs=1e-13), row

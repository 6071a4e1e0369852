"""kNN as the field computes it: the votes against a direct re-computation from their definitions.

DINOv2 (`dinov2/eval/knn.py`), DINO and solo-learn: features L2-normalised, cosine similarity, each
of the k most similar training rows votes exp(sim / T) for its class, T = 0.07. The reference below
is written from that definition, one query and one neighbour at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from cache.errors import ConfigError
from stages.probe.settings import ProbeSettings
from stages.probe.sklearn_probes import KNNProbe


def reference_votes(X, y, Q, k, *, vote="softmax", T=0.07):
    """(N, classes) votes: neighbours in order of similarity, the lower training row first among equals."""
    classes = sorted(set(y.tolist()))

    def unit(v):
        v = np.asarray(v, np.float64)
        return v / max(math.sqrt(sum(a * a for a in v)), 1e-12)

    train = [unit(x) for x in X]
    out = np.zeros((len(Q), len(classes)))
    for n, q in enumerate(Q):
        q = unit(q)
        sims = [float(np.dot(q, x)) for x in train]
        ranked = sorted(range(len(train)), key=lambda i: (-sims[i], i))[: min(k, len(train))]
        exact = [i for i in ranked if sims[i] >= 1.0]
        if vote == "distance" and exact:  # scikit-learn: neighbours at distance 0 take the whole vote, 1 each
            ranked, vote_here = exact, "uniform"
        else:
            vote_here = vote
        for i in ranked:
            if vote_here == "softmax":
                weight = math.exp(sims[i] / T)
            elif vote_here == "uniform":
                weight = 1.0
            else:
                weight = 1.0 / (1.0 - sims[i])
            out[n, classes.index(y[i])] += weight
        if vote == "softmax":
            out[n] /= out[n].sum()
    return out


def votes_of(probe, Q, k):
    return probe.decision_grid(np.asarray(Q, np.float32))[probe.grid_index(k)]


def test_the_default_vote_is_dinov2s_softmax():
    probe = KNNProbe()
    assert (probe.vote, probe.temperature) == ("softmax", 0.07)
    settings = ProbeSettings(store="s", head="knn")
    assert (settings.vote, settings.temperature) == ("softmax", 0.07)
    assert settings.head_options() == {"vote": "softmax", "temperature": 0.07}


def test_hand_worked_softmax_vote():
    # the query (1, 0) has similarities 1, 0.6, 0, -1 with the four rows
    X = np.array([[2, 0], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
    y = np.array([0, 1, 1, 2])
    probe = KNNProbe(ks=(1, 3)).fit(X, y)
    e1, e6, e0 = math.exp(1 / 0.07), math.exp(0.6 / 0.07), 1.0
    np.testing.assert_allclose(votes_of(probe, [[1, 0]], 1), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        votes_of(probe, [[1, 0]], 3), [[e1 / (e1 + e6 + e0), (e6 + e0) / (e1 + e6 + e0), 0.0]], rtol=1e-5
    )  # 0.6 and 0.8 are not exact in float32
    # a large temperature makes every neighbour's vote equal: the majority of the 3 wins
    hot = KNNProbe(ks=(3,), temperature=1e9).fit(X, y)
    np.testing.assert_allclose(votes_of(hot, [[1, 0]], 3), [[1 / 3, 2 / 3, 0.0]], rtol=1e-6)
    assert hot.predict(np.float32([[1, 0]])) == [1] and probe.predict(np.float32([[1, 0]])) == [0]


def test_equally_similar_rows_at_the_k_boundary_the_lower_row_is_the_neighbour():
    # rows 1 and 2 are both at similarity 0 with the query; k = 2 takes row 1 (class 1), never row 2 (class 2)
    X = np.array([[1, 0], [0, 1], [0, -1], [0, 1]], np.float32)
    y = np.array([0, 1, 2, 2])
    for vote in ("softmax", "uniform", "distance"):
        probe = KNNProbe(ks=(2, 3), vote=vote).fit(X, y)
        for k in (2, 3):
            np.testing.assert_allclose(
                votes_of(probe, [[1, 0]], k), reference_votes(X, y, [[1, 0]], k, vote=vote), rtol=1e-5
            )  # float32 similarities
        assert votes_of(probe, [[1, 0]], 2)[0, 2] == 0.0
    # equal votes of two classes: the lower class wins
    uniform = KNNProbe(ks=(2,), vote="uniform").fit(X[:2], y[:2])
    assert uniform.predict(np.float32([[1, 1]])) == [0]


def test_k_larger_than_the_train_set_means_every_row():
    X = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    y = np.array([0, 1, 1])
    probe = KNNProbe(ks=(2, 50)).fit(X, y)
    assert list(probe.ks_) == [2, 3] and probe.grid_index(50) == 1
    np.testing.assert_allclose(votes_of(probe, [[1, 0]], 50), reference_votes(X, y, [[1, 0]], 3), rtol=1e-5)


def test_one_class_takes_every_vote():
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    probe = KNNProbe(ks=(1, 3)).fit(X, np.full(5, 7))
    assert list(probe.classes_) == [7]
    np.testing.assert_allclose(probe.decision_grid(X[:2]), np.ones((2, 2, 1)))
    assert list(probe.predict(X[:2])) == [7, 7]


@pytest.mark.parametrize("vote", ["softmax", "uniform", "distance"])
def test_every_vote_equals_the_definition_on_random_data(vote):
    rng = np.random.default_rng(1)
    X, Q = rng.normal(size=(60, 5)).astype(np.float32), rng.normal(size=(15, 5)).astype(np.float32)
    y = rng.integers(0, 4, 60)
    probe = KNNProbe(ks=(1, 4, 10, 200), vote=vote, temperature=0.1).fit(X, y)
    for k in (1, 4, 10, 200):
        np.testing.assert_allclose(
            votes_of(probe, Q, k), reference_votes(X, y, Q, k, vote=vote, T=0.1), rtol=1e-5, atol=1e-12
        )


def test_softmax_chooses_what_dinov2s_normalisation_chooses():
    """DINOv2 takes the softmax over its largest k and sums the first k of it: a per-query factor, the same argmax."""
    rng = np.random.default_rng(2)
    X, Q = rng.normal(size=(80, 6)).astype(np.float32), rng.normal(size=(30, 6)).astype(np.float32)
    y = rng.integers(0, 5, 80)
    probe = KNNProbe(ks=(10, 20)).fit(X, y)
    sims, index = probe.neighbours(Q)
    weights = np.exp(sims / 0.07)
    weights /= weights.sum(axis=1, keepdims=True)  # over the largest k (20)
    for j, k in enumerate((10, 20)):
        theirs = np.zeros((len(Q), 5))
        np.add.at(theirs, (np.arange(len(Q))[:, None].repeat(k, 1), y[index[:, :k]]), weights[:, :k])
        np.testing.assert_array_equal(probe.decision_grid(Q)[j].argmax(1), theirs.argmax(1))


def test_distance_vote_is_scikit_learns():
    rng = np.random.default_rng(3)
    X, Q = rng.normal(size=(100, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    y = rng.integers(0, 3, 100)
    probe = KNNProbe(ks=(7,), vote="distance").fit(X, y)
    reference = KNeighborsClassifier(7, metric="cosine", weights="distance", algorithm="brute").fit(X, y)
    np.testing.assert_array_equal(probe.predict(Q), reference.predict(Q))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (
            {"vote": "majority"},
            "The 'vote' parameter of KNNProbe must be a str among {'softmax', 'distance', 'uniform'}",
        ),
        (
            {"temperature": 0.0},
            "The 'temperature' parameter of KNNProbe must be a float in the range (0.0, inf). Got 0.0",
        ),
        ({"temperature": -1}, "Got -1 instead"),
    ],
)
def test_bad_votes_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError) as error:
        KNNProbe(**kwargs).fit(np.eye(3, dtype=np.float32), [0, 1, 2])
    assert fragment in str(error.value)
    with pytest.raises(ConfigError):
        ProbeSettings(store="s", head="knn", **kwargs)

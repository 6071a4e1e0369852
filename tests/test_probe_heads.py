"""Heads, banks and the scikit-learn probes against their references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import log_loss
from sklearn.neighbors import KNeighborsClassifier

from stages.probe import banks
from stages.probe import heads as H
from stages.probe.sklearn_probes import KNNProbe, LogRegProbe, RidgeProbe, check_grid, topk_labels


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    mean, std = X[:1200].mean(0), X[:1200].std(0)
    std[std == 0] = 1
    X = (X - mean) / std
    return X[:1000], y[:1000], X[1000:1200], y[1000:1200], X[1200:], y[1200:]


# -- banks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden,batchnorm", [((), False), ((), True), ((8, 6), False), ((5,), True)])
def test_flat_bank_members_are_the_exported_heads(hidden, batchnorm):
    torch.manual_seed(0)
    dims, L, K, B = [12, 7, 12, 3], 3, 5, 9
    bank = banks.FlatBank(dims, L, K, hidden=hidden, batchnorm=batchnorm)
    groups = H_groups(dims)
    inputs = [torch.randn(len(g), B, dims[g[0]]) for g in groups]
    bank.train()
    bank(inputs)  # one training step's batch statistics into the running ones
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    bank.eval()
    logits = bank(inputs)
    assert logits.shape == (len(dims) * L, B, K)
    for member in range(bank.num_members):
        i, _ = bank.member(member)
        g = next(n for n, members in enumerate(groups) if i in members)
        x = inputs[g][groups[g].index(i)]
        head = bank.export(member)
        torch.testing.assert_close(head(x.view(B, -1, 1, 1)), logits[member], rtol=1e-5, atol=1e-5)


def H_groups(dims):
    return banks.group_by_dim(dims)


def test_bank_members_train_independently():
    """The summed loss of a bank trains each member exactly as if it were alone."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 32, 10), torch.randint(0, 4, (32,))
    hypers = [{"lr": 1e-2, "weight_decay": 1e-4}, {"lr": 1e-1, "weight_decay": 0.0}]
    seeds = [[11, 12], [13, 14]]

    def train(dims_seeds, inputs):
        bank = banks.FlatBank([10] * len(dims_seeds), len(hypers), 4, hidden=(6,), seeds=dims_seeds)
        optimizer = torch.optim.AdamW(bank.param_groups(hypers))
        for _ in range(5):
            logits = bank([inputs])
            loss = (
                torch.nn.functional.cross_entropy(logits.reshape(-1, 4), y.repeat(bank.num_members)) * bank.num_members
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return bank

    both = train(seeds, x)
    alone = train(seeds[1:], x[1:])
    for member in range(2):
        a, b = both.export(2 + member), alone.export(member)
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_param_groups_carry_each_hyper_set():
    bank = banks.FlatBank([4, 4, 6], 2, 3)
    groups = bank.param_groups([{"lr": 0.1, "weight_decay": 0.01}, {"lr": 0.2, "weight_decay": 0.02}])
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.01), (0.1, 0.0), (0.2, 0.02), (0.2, 0.0)]
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(bank.parameters()))


@pytest.mark.parametrize(
    "kind,inputs,options",
    [
        ("cnn", [(3, 4), (2, 4)], {"width": 8}),
        ("attention", [(3, 2), (5, 1), (2, 4)], {"dim": 8, "depth": 2, "heads": 2}),
        ("mlp", [(3, 2)], {"hidden": [7]}),
    ],
)
def test_heads_take_pooled_grids_and_round_trip_through_safetensors(tmp_path, kind, inputs, options):
    torch.manual_seed(0)
    head = H.build_head(kind, inputs, 6, options).eval()
    xs = [torch.randn(5, c, g, g) for c, g in inputs]
    means = [torch.randn(c, 1, 1) for c, _ in inputs]
    stds = [torch.rand(c, 1, 1) + 0.5 for c, _ in inputs]
    probe = H.Probe(head, means, stds).eval()
    expected = head(*[(x - m) / s for x, m, s in zip(xs, means, stds)])
    H.save_probe(probe, tmp_path / "p", {"kind": kind, "inputs": inputs, "num_classes": 6, "options": options})
    loaded, config = H.load_probe(tmp_path / "p")
    assert config["kind"] == kind
    with torch.no_grad():
        torch.testing.assert_close(loaded(*xs), expected)


def test_cnn_head_refuses_small_grids():
    with pytest.raises(ValueError, match="at least 4x4"):
        H.build_head("cnn", [(3, 2)], 4, {})


def test_attention_head_fuses_inputs_of_different_grids():
    head = H.AttentionHead([(3, 2), (4, 1)], 5, dim=8, depth=1, heads=2)
    assert head(torch.randn(6, 3, 2, 2), torch.randn(6, 4, 1, 1)).shape == (6, 5)


def test_member_seeds_are_stable_and_distinct():
    assert banks.member_seed(0, "linear", "b1_t10_p1", 0.1) == banks.member_seed(0, "linear", "b1_t10_p1", 0.1)
    assert len({banks.member_seed(s, "linear", k, 0.1) for s in (0, 1) for k in ("a", "b")}) == 4


# -- scikit-learn probes ---------------------------------------------------------------------------------
def test_logreg_probe_fits_every_C_like_scikit_learn(digits):
    X, y, Xv, yv, Xt, yt = digits
    probe = LogRegProbe(Cs=(1.0, 0.1)).fit(X, y, Xv, yv)
    assert list(probe.Cs_) == [0.1, 1.0]
    for j, C in enumerate(probe.Cs_):
        reference = LogisticRegression(C=C, max_iter=2000, tol=1e-8).fit(X, y)
        agreement = np.mean(reference.predict(Xt) == probe.classes_[probe.decision_grid(Xt)[j].argmax(1)])
        assert agreement >= 0.99
    # chosen by validation top-1, ties to the lower validation loss (the torch sweep's `select`)
    tied = np.flatnonzero(probe.val_top1_ == probe.val_top1_.max())
    losses = [log_loss(yv, softmax(probe.decision_grid(Xv)[j], axis=1), labels=probe.classes_) for j in tied]
    assert probe.best_C_ == probe.Cs_[tied[int(np.argmin(losses))]]
    assert probe.score(Xt, yt) > 0.9


def test_ridge_probe_solves_every_alpha_like_ridge_classifier(digits):
    X, y, Xv, yv, Xt, _ = digits
    probe = RidgeProbe(alphas=(0.5, 50.0)).fit(X, y, Xv, yv)
    for j, alpha in enumerate(probe.alphas_):
        reference = RidgeClassifier(alpha=alpha).fit(X, y)
        np.testing.assert_allclose(probe.coefs_[j], reference.coef_, atol=1e-4)
        np.testing.assert_allclose(probe.intercepts_[j], reference.intercept_, atol=1e-4)
    wide = RidgeProbe(alphas=(5.0,)).fit(X[:40], y[:40])  # fewer samples than features: the dual form
    reference = RidgeClassifier(alpha=5.0).fit(X[:40], y[:40])
    np.testing.assert_allclose(wide.coef_, reference.coef_, atol=1e-4)


def test_knn_probe_answers_every_k_from_one_search_like_scikit_learn(digits):
    X, y, Xv, yv, Xt, _ = digits
    X = np.vstack([X, X[:3]])  # exact duplicates: distance 0 takes the whole vote
    y = np.concatenate([y, y[:3]])
    probe = KNNProbe(ks=(1, 7, 20), vote="distance").fit(X, y, Xv, yv)
    queries = np.vstack([Xt, X[:3]])
    scores = probe.decision_grid(queries)
    for j, k in enumerate(probe.ks_):
        reference = KNeighborsClassifier(int(k), metric="cosine", weights="distance", algorithm="brute").fit(X, y)
        assert np.mean(reference.predict(queries) == probe.classes_[scores[j].argmax(1)]) >= 0.995
    small = KNNProbe(ks=(5, 10_000)).fit(X[:30], y[:30])
    assert list(small.ks_) == [5, 30] and small.grid_index(10_000) == 1
    with pytest.raises(ValueError, match="not in the fitted grid"):
        small.grid_index(6)


def test_grids_are_validated():
    with pytest.raises(
        ValueError,
        match=r"The 'Cs' parameter of LogRegProbe must be a non-empty sequence of floats in the range "
        r"\(0.0, inf\). Got \(-1.0,\) instead.",
    ):
        LogRegProbe(Cs=(-1.0,)).fit(np.zeros((4, 2)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="integers"):
        check_grid("KNNProbe", "ks", (1.5,), integer=True)


def test_topk_labels_breaks_ties_by_class_order():
    scores = np.array([[0.0, 1.0, 1.0, -1.0]])
    np.testing.assert_array_equal(topk_labels(scores, np.array([10, 11, 12, 13]), 3), [[11, 12, 10]])


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_flat_bank_loss_is_the_sum_of_member_cross_entropies(hidden):
    torch.manual_seed(0)
    bank = banks.FlatBank([6, 4, 6], 2, 3, hidden=hidden)
    inputs = [torch.randn(1, 7, 4), torch.randn(2, 7, 6)]
    labels = torch.randint(0, 3, (7,))
    logits = bank(inputs)
    expected = sum(torch.nn.functional.cross_entropy(member, labels) for member in logits)
    torch.testing.assert_close(bank.loss(inputs, labels), expected)


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_flat_bank_keep_computes_only_the_kept_members(hidden):
    torch.manual_seed(0)
    bank = banks.FlatBank([6, 4, 6], 3, 3, hidden=hidden)
    inputs = [torch.randn(1, 7, 4), torch.randn(2, 7, 6)]
    labels = torch.randint(0, 3, (7,))
    full = bank(inputs)
    kept = [1, 2, 3, 5, 6, 8]  # two of three hyper-parameter sets per input set, different ones
    bank.keep(kept)
    assert bank.active == kept
    torch.testing.assert_close(bank(inputs), full[kept])
    expected = sum(torch.nn.functional.cross_entropy(full[m], labels) for m in kept)
    loss = bank.loss(inputs, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    retired = bank.weights[bank._slot[(1, 0, 0)]].grad  # group of dim 6, hyper-parameter set 0
    assert retired[0].abs().sum() == 0 and retired[1].abs().sum() > 0  # input set 0 retired it, input set 2 did not
    with pytest.raises(ValueError, match="same number"):
        bank.keep([0, 1, 3])


def test_module_bank_keep_computes_only_the_kept_members():
    torch.manual_seed(0)
    bank = banks.ModuleBank("cnn", [[(3, 4)], [(3, 4)]], 2, 4, {"width": 4}, seeds=[[1, 2], [3, 4]]).eval()
    sets = [[torch.randn(5, 3, 4, 4)], [torch.randn(5, 3, 4, 4)]]
    full = bank(sets)
    bank.keep([1, 2])
    torch.testing.assert_close(bank(sets), full[[1, 2]])

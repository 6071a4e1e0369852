"""Feature stores written directly from known features, for the probe tests (helpers + their own checks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache import FeatureStore, FeatureStoreWriter
from cache import layout
from cache.writer import SplitIndex


def write_store(path: Path, features: dict, labels: dict, *, classes: list[str] | None = None, resolution: dict | None = None,
                chunk_samples: int = 64, pools=(1,), skip_chunks: dict | None = None, data_kind: str | None = None) -> Path:
    """features[(block, timestep)][split] = (N, C, g, g); labels[split] = (N,).

    `resolution[block]` defaults to the stored grid; `skip_chunks[(split, block, timestep)]` lists
    sample chunks left unwritten (an unfinished extraction); `data_kind` is the data set's kind as
    extraction records it (stages.data.registry), e.g. "dogs".
    """
    num_classes = int(max(int(v.max()) for v in labels.values())) + 1
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    data = {"classes": classes or [str(i) for i in range(num_classes)], **({"kind": data_kind} if data_kind else {})}
    settings.update(kind="test", data=data, noise_seed=0,
                    dtype="float32", precision="fp32", chunk_samples=int(chunk_samples))
    blocks = sorted({b for b, _ in features})
    table = []
    for b in blocks:
        sample = next(v for (bb, _), v in features.items() if bb == b)["train"]
        res = (resolution or {}).get(b, sample.shape[-1])
        table.append({"number": b, "module": f"block{b}", "adm_name": f"blocks[{b}]", "channels": int(sample.shape[1]),
                      "resolution": int(res)})
    splits = {s: SplitIndex(np.asarray(y, np.int64), [f"{s}/{i}.png" for i in range(len(y))]) for s, y in labels.items()}
    skip = skip_chunks or {}
    with FeatureStoreWriter.open(path, settings=settings, splits=splits, block_table=table) as writer:
        for b in blocks:
            grid = next(v for (bb, _), v in features.items() if bb == b)["train"].shape[-1]
            writer.add_arrays({b: int(grid)}, sorted(t for bb, t in features if bb == b), list(pools))
        for split, y in labels.items():
            for chunk in range(layout.num_chunks(len(y), chunk_samples)):
                rows = layout.chunk_slice(chunk, len(y), chunk_samples)
                arrays = {key: value[split][rows] for key, value in features.items()
                          if chunk not in skip.get((split, *key), [])}
                if arrays:
                    writer.write_shard(split, chunk, arrays)
    return Path(path)


def digits_features(seed: int = 0, n_train: int = 1200):
    """scikit-learn's digits as features: block 1 = the 8x8 image (1 channel), block 2 = a random
    4-channel 8x8 projection; timesteps 10 (clean) and 90 (noisier). Class-sorted order, as an
    image folder gives."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    X, y = X[order].astype(np.float32).reshape(-1, 1, 8, 8), y[order]
    splits = {"train": slice(0, n_train), "val": slice(n_train, None)}
    labels, features = {}, {}
    projection = rng.normal(size=(4, 1)).astype(np.float32)
    for split, rows in splits.items():
        sort = np.argsort(y[rows], kind="stable")  # class-sorted like an image folder
        images, labels[split] = X[rows][sort], y[rows][sort]
        noise = rng.normal(size=images.shape).astype(np.float32)
        for t, scale in ((10, 0.5), (90, 4.0)):
            noisy = images + scale * noise
            features.setdefault((1, t), {})[split] = noisy
            features.setdefault((2, t), {})[split] = np.tanh(np.einsum("oc,nchw->nohw", projection, noisy) / 8)
    return features, labels


def test_written_store_reads_back(tmp_path):
    features, labels = digits_features()
    store = FeatureStore.open(write_store(tmp_path / "s.zarr", features, labels, pools=(1, 2, 4, 8)))
    assert store.blocks == [1, 2] and store.timesteps == [10, 90]
    np.testing.assert_array_equal(store.read("train", 1, 90), features[(1, 90)]["train"])
    np.testing.assert_array_equal(store.labels("val"), labels["val"])
    assert store.missing() == {}

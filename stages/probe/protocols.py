"""The field's evaluation protocols by name (`pipeline probe --protocol NAME`), as data: one table.

A protocol fixes, per head, the probe settings that make a number comparable with a published one.
Each row maps ProbeSettings fields to values; a setting given explicitly (`--epochs 5`) still wins,
as with `--recipe`. The `summary` of each protocol is what docs/probes.md shows side by side.

- `default`: this project's own training (`stages.probe.registry` rows): standardised features,
  AdamW with a cosine schedule, successive halving over the learning rates, logreg over its C grid.
- `diffssl`: the paper's code (soumik-kanad/diffssl), i.e. `--recipe diffssl` (`stages.probe.recipes`).
- `dinov2`: facebookresearch/dinov2 `dinov2/eval/linear.py`, `knn.py`, `log_regression.py`:
  raw (not standardised) features; linear heads for every learning rate of its list trained
  together (SGD, momentum 0.9, no weight decay, cosine to 0 per step, no warm-up, batch 128, lr
  scaled by batch / 256, the best chosen on validation); kNN on L2-normalised features with a
  softmax vote exp(sim / T), T = 0.07, k in {10, 20, 100, 200}; logistic regression over 45 C
  values log-spaced from 1e-6 to 1e5, warm-started along the path.

Imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import numpy as np

# DINOv2's default --learning-rates (linear.py), applied as lr * batch_size / 256 (its `scale_lr`).
DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DINOV2_BATCH_SIZE = 128
# DINOv2's C path (log_regression.py: 10 ** torch.linspace(-6, 5, 45)).
DINOV2_CS = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))

DEFAULT, DIFFSSL, DINOV2 = "default", "diffssl", "dinov2"

PROTOCOLS: dict[str, dict[str, dict]] = {
    DEFAULT: {},  # every head as its registry row says
    DIFFSSL: {head: {"recipe": "diffssl"} for head in ("linear", "mlp", "attention")},
    DINOV2: {
        "linear": {
            "standardise": False,
            "optimizer": "sgd",  # momentum 0.9, as the project's sgd
            "lrs": tuple(lr * DINOV2_BATCH_SIZE / 256 for lr in DINOV2_LEARNING_RATES),
            "weight_decays": (0.0,),
            "batch_size": DINOV2_BATCH_SIZE,
            "warmup": 0.0,
            "epochs": 10,
            "halving": False,  # every head trains to the end, as DINOv2's AllClassifiers
            "solver": "minibatch",
        },
        # `vote` and `temperature` are KNNProbe options added on branch h-protocols
        "knn": {"standardise": False, "ks": (10, 20, 100, 200), "vote": "softmax", "temperature": 0.07},
        # log_regression.py refits the chosen C on train + val before the test
        "logreg": {"standardise": False, "Cs": DINOV2_CS, "refit": True},
    },
}

SUMMARY: dict[str, dict[str, str]] = {
    DEFAULT: {
        "features": "standardised per feature (fit rows' mean and std)",
        "linear": "in memory: batched L-BFGS to convergence over logreg's C grid (weight decay 1 / (C n)), "
        "warm-started along the path, stopped past each input set's validation peak; minibatch solver "
        "(AdamW, cosine with 5% warm-up, 10 epochs or 200 steps, lr grid 1e-3..3e-2, successive halving) "
        "when streaming",
        "logreg": "L-BFGS, C grid 1e-3..10, warm-started along increasing C",
        "knn": "cosine similarity, vote 1 / cosine distance, k 1..100",
    },
    DIFFSSL: {
        "features": "raw",
        "linear": "SGD without momentum, StepLR(7, 0.1) per epoch, 28 epochs, batch 128, lr 1e-2, no grid",
        "logreg": "(not part of the protocol: the project's default)",
        "knn": "(not part of the protocol: the project's default)",
    },
    DINOV2: {
        "features": "raw (kNN: L2-normalised)",
        "linear": "SGD momentum 0.9, no weight decay, cosine to 0 per step, no warm-up, 10 epochs, batch 128, "
        "13 lrs 1e-5..0.1 x batch/256, all trained to the end together",
        "logreg": "L-BFGS, 45 C values log-spaced 1e-6..1e5, warm-started along the path, the chosen C refitted on "
        "train + validation",
        "knn": "cosine similarity, softmax vote exp(sim / 0.07), k in 10, 20, 100, 200",
    },
}


def protocol_settings(protocol: str, head: str) -> dict:
    """The settings `protocol` fixes for `head` ({} where it says nothing about that head)."""
    return dict(PROTOCOLS[protocol].get(head, {}))

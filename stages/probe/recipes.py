"""The paper's own training recipes (`pipeline probe --recipe diffssl`), as data.

soumik-kanad/diffssl (`finetune.py`, `scripts/linear.sh`, `scripts/attention.sh`, `scripts/fusion.sh`)
trains one head with fixed hyper-parameters, no grid and no model selection:

    raw features (no standardisation), nn.Linear's default initialisation,
    SGD without momentum or weight decay, StepLR(step 7, gamma 0.1) stepped once per epoch,
    28 epochs, batch 128 (4 GPUs x 32, the last partial batch dropped),
    lr 1e-2 (linear, MLP: `Head`) or 5e-2 (attention: `AttentionFusion`).

`RECIPES` holds the overridable part: a setting given explicitly (`--epochs 10`) wins over the
recipe's value. The fixed part (raw features, the step schedule, no momentum, the default
initialisation, dropped last batch) is what makes it the recipe, and is read by the torch sweep from
`ProbeSettings.recipe`. With `--head attention` the head is the paper's (`stages.probe.diffssl`,
registry row "diffssl-attention"), on grids pooled to 16x16 (`--pool 16`) as the paper's
`--pre_pool_size 16`.
"""

from __future__ import annotations

RECIPE_HEADS = ("linear", "mlp", "attention")
STEP_EPOCHS, STEP_GAMMA = 7, 0.1  # torch.optim.lr_scheduler.StepLR(optimizer, 7, 0.1), per epoch

_COMMON = {"epochs": 28, "batch_size": 128, "weight_decays": (0.0,), "optimizer": "sgd", "halving": False}
RECIPES = {
    "diffssl": {
        "linear": {**_COMMON, "lrs": (1e-2,)},
        "mlp": {**_COMMON, "lrs": (1e-2,)},
        "attention": {**_COMMON, "lrs": (5e-2,), "dim": 1024, "depth": 2, "attention_heads": 8},
    },
}
# The head the recipe trains for a requested head kind (the paper's attention head is its own row).
RECIPE_HEAD_KIND = {"diffssl": {"linear": "linear", "mlp": "mlp", "attention": "diffssl-attention"}}


def recipe_lr(base_lr: float, epoch: int) -> float:
    """The learning rate of (0-based) `epoch` under StepLR(7, 0.1): what the paper's optimizer uses."""
    return base_lr * STEP_GAMMA ** (epoch // STEP_EPOCHS)

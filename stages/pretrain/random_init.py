"""The default pipeline's baseline: a randomly initialised U-Net with a trained one's exact config.

The "same U-Net, no pretraining" twin. Initialised as `stages.pretrain.ddpm.pretrain_ddpm`
initialises (seed, then construct), so with the seed of the training run it is bit-for-bit the
trained model's starting point (`init_weights_sha256` in the training log).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import UNet2DModel

from cache.errors import ConfigError
from stages.models.loading import load_model, weights_hash
from stages.outputs import check_output_dir, holds_only, staged_output
from stages.pretrain.ddpm import MODEL_FILES, seed_everything


def is_random_init_output(out: Path) -> bool:
    """Whether `out` holds only what `random_init_copy` writes."""
    return (out / "random_init.json").is_file() and holds_only(out, MODEL_FILES | {"random_init.json"})


def random_init_copy(model_dir: str | Path, out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> dict:
    """Save a freshly initialised U-Net with `model_dir`'s exact config and scheduler to `out_dir`.

    Initialised as `pretrain_ddpm` initialises (seed, then construct), so with the training seed
    the weights equal the trained model's starting point. Writes `random_init.json` and returns it.
    """
    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise ConfigError(f"{out_dir}: the random-init copy must not overwrite the model it copies")
    check_output_dir(Path(out_dir), made_by=is_random_init_output, command="random-init", overwrite=overwrite)
    loaded = load_model(model_dir)
    seed_everything(seed)
    unet = UNet2DModel.from_config(loaded.unet.config).eval()
    record = {
        "seed": int(seed),
        "config_from": str(model_dir),
        "config_from_weights_sha256": weights_hash(loaded.unet),
        "weights_sha256": weights_hash(unet),
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    with staged_output(Path(out_dir)) as out:
        unet.save_pretrained(out)
        loaded.scheduler.save_pretrained(out)
        (out / "random_init.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

"""The weights' sha256 a model directory records about itself, checked every time it is loaded.

`pipeline pretrain` writes `train_log.json` and `pipeline random-init` writes `random_init.json` beside the
weights, each with `weights_sha256` (`stages.models.loading.weights_hash`, a hash of the state dict). A
directory that holds one is read only if its weights still hash to it: features, probes and the report of
the default pipeline all depend on the bundled checkpoint, so a damaged or edited copy is refused, not used.
The error names one command that restores the directory: `git checkout` where git tracks the weights (the
bundled checkpoint), else the command that made them, rebuilt from the record.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cache.errors import UserError

RECORDS = ("train_log.json", "random_init.json")  # pipeline pretrain's, pipeline random-init's
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class WeightsChangedError(UserError):
    """A model directory's weights no longer hash to the sha256 its own record holds."""


def recorded_weights(directory: str | Path) -> tuple[str, dict] | None:
    """(record file name, record) of the first record in `directory` that holds `weights_sha256`, else None."""
    for name in RECORDS:
        try:
            record = json.loads((Path(directory) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("weights_sha256"), str):
            return name, record
    return None


def check_recorded_weights(directory: str | Path, actual_sha256: str) -> None:
    """Raise WeightsChangedError when `directory` records a weights sha256 other than `actual_sha256`."""
    found = recorded_weights(directory)
    if found is None:
        return
    name, record = found
    expected = record["weights_sha256"]
    if actual_sha256 != expected:
        raise WeightsChangedError(
            f"{directory}: the weights hash to sha256 {actual_sha256[:16]}…, not the {expected[:16]}… its {name} "
            f"records (they were changed or damaged after they were written); restore them: "
            f"{restore_command(directory, name, record)}"
        )


def restore_command(directory: str | Path, name: str, record: dict) -> str:
    """One command that makes `directory` hold weights matching a record again."""
    path = str(directory)
    if _tracked_by_git(Path(directory) / WEIGHTS_FILE):
        return f"git checkout -- {path}"
    if name == "random_init.json":
        return f"pipeline random-init --model {record['config_from']} --out {path} --seed {record['seed']} --overwrite"
    return pretrain_command(record, path) + " --overwrite"


def pretrain_command(log: dict, out: str) -> str:
    """The `pipeline pretrain` command line that trains what training log `log` describes into `out`."""
    config = log["config"]
    levels = [str(i) for i, kind in enumerate(config["down_block_types"]) if kind.startswith("Attn")]
    return (
        f"pipeline pretrain --data {log['data_dir']} --out {out} --epochs {log['epochs_requested']} "
        f"--image-size {log['image_size']} --batch-size {log['batch_size']} --lr {log['optimizer']['lr']:g} "
        f"--channels {','.join(str(c) for c in config['block_out_channels'])} "
        f"--attention-levels {','.join(levels) or 'none'} --seed {log['seed']}"
    )


def _tracked_by_git(file: Path) -> bool:
    try:
        done = subprocess.run(
            ["git", "ls-files", "--error-unmatch", file.name], cwd=file.parent, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):  # no git, or not a directory git can run in
        return False
    return done.returncode == 0

"""Helpers the test modules share (test modules never import each other): tiny models and image folders
on disk, feature stores written from known features, digests of what must stay unchanged, the
documented preprocessing written out again, ranks of an extraction job started as torchrun starts them,
and the command line run with some packages missing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from cache import FeatureStore, FeatureStoreWriter, layout
from cache.writer import SplitIndex
from stages.models.unet_configs import tiny_adm_config

from s3_server import closed_port


# -- models and image folders -----------------------------------------------------------------------------
def make_model_dir(path: Path, *, image_size: int = 16, in_channels: int = 3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(**tiny_adm_config(image_size=image_size, in_channels=in_channels))
    # Zero-initialised output convolutions would hide mapping errors: give every weight a value.
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.05)
    unet.save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path


def make_image_folder(
    root: Path,
    *,
    counts: dict[str, int],
    classes: int = 3,
    size=(20, 24),
    seed: int = 0,
    mode: str = "RGB",
    suffix: str = ".png",
) -> Path:
    """`counts` images per split, spread over `classes` folders; odd sizes exercise resize and crop."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for i in range(count):
            directory = root / split / f"class{i % classes}"
            directory.mkdir(parents=True, exist_ok=True)
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(directory / f"img{i:04d}{suffix}")
    return root


def reference_image(path, size: int) -> torch.Tensor:
    """The documented preprocessing, written out again: short side to `size` (bicubic), centre crop."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


# -- feature stores from known features ------------------------------------------------------------------
def write_store(
    path: Path,
    features: dict,
    labels: dict,
    *,
    classes: list[str] | None = None,
    resolution: dict | None = None,
    chunk_samples: int = 64,
    pools=(1,),
    skip_chunks: dict | None = None,
    data_kind: str | None = None,
) -> Path:
    """features[(block, timestep)][split] = (N, C, g, g); labels[split] = (N,).

    `resolution[block]` defaults to the stored grid; `skip_chunks[(split, block, timestep)]` lists
    sample chunks left unwritten (an unfinished extraction); `data_kind` is the data set's kind as
    extraction records it (stages.data.registry), e.g. "dogs".
    """
    num_classes = int(max(int(v.max()) for v in labels.values())) + 1
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    data = {"classes": classes or [str(i) for i in range(num_classes)], **({"kind": data_kind} if data_kind else {})}
    settings.update(
        kind="test", data=data, noise_seed=0, dtype="float32", precision="fp32", chunk_samples=int(chunk_samples)
    )
    blocks = sorted({b for b, _ in features})
    table = []
    for b in blocks:
        sample = next(v for (bb, _), v in features.items() if bb == b)["train"]
        res = (resolution or {}).get(b, sample.shape[-1])
        table.append(
            {
                "number": b,
                "module": f"block{b}",
                "adm_name": f"blocks[{b}]",
                "channels": int(sample.shape[1]),
                "resolution": int(res),
            }
        )
    splits = {
        s: SplitIndex(np.asarray(y, np.int64), [f"{s}/{i}.png" for i in range(len(y))]) for s, y in labels.items()
    }
    skip = skip_chunks or {}
    with FeatureStoreWriter.open(path, settings=settings, splits=splits, block_table=table) as writer:
        for b in blocks:
            grid = next(v for (bb, _), v in features.items() if bb == b)["train"].shape[-1]
            writer.add_arrays({b: int(grid)}, sorted(t for bb, t in features if bb == b), list(pools))
        for split, y in labels.items():
            for chunk in range(layout.num_chunks(len(y), chunk_samples)):
                rows = layout.chunk_slice(chunk, len(y), chunk_samples)
                arrays = {
                    key: value[split][rows]
                    for key, value in features.items()
                    if chunk not in skip.get((split, *key), [])
                }
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


# -- what must stay as it was ----------------------------------------------------------------------------
def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# -- processes: ranks of a job, a command line without some packages ----------------------------------------
REPO = Path(__file__).resolve().parents[1]
DIST_ARGS = [
    "--blocks",
    "2,5,9",
    "--timesteps",
    "10,90",
    "--pool",
    "1,2",
    "--batch-size",
    "4",
    "--chunk-samples",
    "4",
    "--shard-samples",
    "8",
]

# Each rank records the shards it writes; rank `KILL_RANK` kills itself before its `KILL_AT`-th shard.
RECORDING = (
    "import json, os, signal, sys\n"
    "import cache.writer as w\n"
    "original = w.FeatureStoreWriter.write_shard\n"
    "count = [0]\n"
    "def write_shard(self, split, shard, *args, **kwargs):\n"
    "    count[0] += 1\n"
    "    if os.environ.get('KILL_RANK') == os.environ.get('RANK', '0') and count[0] == int(os.environ['KILL_AT']):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    result = original(self, split, shard, *args, **kwargs)\n"
    "    with open(os.environ['RECORD'] + '.' + os.environ.get('RANK', '0'), 'a') as f:\n"
    "        f.write(json.dumps([split, shard]) + '\\n')\n"
    "    return result\n"
    "w.FeatureStoreWriter.write_shard = write_shard\n"
    "from pipeline.cli import main\n"
    "main(sys.argv[1:])\n"
)


def launch(tiny_model, data, out, world_size: int, record: Path, *extra, env: dict | None = None):
    """`world_size` processes of `pipeline extract`, started the way torchrun starts them."""
    port = closed_port()
    processes = []
    for rank in range(world_size):
        rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "RECORD": str(record), **(env or {})}
        if world_size > 1:
            rank_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                PIPELINE_DIST_TIMEOUT="120",
            )
        command = [
            sys.executable,
            "-c",
            RECORDING,
            "extract",
            "--model",
            str(tiny_model),
            "--data",
            str(data),
            "--out",
            str(out),
            *DIST_ARGS,
            *extra,
        ]
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


def finish(processes, timeout=240):
    """Every rank's (exit status, stdout, stderr); ranks still running after `timeout` are killed (a test
    never leaves a process behind)."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def decoded(path) -> dict:
    store = FeatureStore.open(path)
    values = {(split, "labels"): store.labels(split) for split in store.splits}
    for split in store.splits:
        for block, timestep in store.arrays():
            values[(split, block, timestep)] = store.read(split, block, timestep)
    return values


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


# Runs the command line with some top-level packages made unimportable, as in a base install.
BLOCKED = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # what `import` and `importlib.util.find_spec` make of a package not installed
from pipeline.cli import main
main(sys.argv[2:], prog_name="pipeline")
"""


def run_without(modules: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED, ",".join(modules), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )

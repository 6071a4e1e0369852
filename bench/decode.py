"""Images per second per CPU core of the project's image pipeline on ImageNet-like JPEGs, and the cores one
H200 running ADM-256 to block 30 in bf16 would need to be fed.

    python bench/decode.py                      # 48 JPEGs of 500x375, quality 90; sizes 256, 128, 64
    python bench/decode.py --device cuda        # also torchvision's batched decode_jpeg on the GPU

Every path runs in this one process on one thread, side by side over the same bytes, timed by the
process's CPU time (images per CPU second = images per second of one core):

- decode only: PIL, and `torchvision.io.decode_jpeg` on the CPU (both libjpeg-turbo): identical pixels?
- the project's pipeline (`stages.data.images.load_image`: decode, RGB, bicubic short-side resize,
  centre crop, float in [-1, 1]) "exact", with guided-diffusion's "adm" resize, and with PIL's
  JPEG `draft` (DCT-scaled decode; the largest difference from exact is printed);
- each kind of input through its own reader (`open_dataset(...)[split].read`): an image folder, WebDataset
  shards, a Hugging Face parquet data set: the same images, so the difference is the reading;
- with --device cuda: `decode_jpeg(list, device="cuda")` in batches (decode only; the resize on the GPU
  would not be the project's PIL resize).

The forward's cost is counted, not timed: FLOPs of ADM-256 (554M parameters) to block 30 by torch's
FlopCounterMode on the meta device, at 50% of the H200's dense bf16 peak (989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.data.images import load_image  # noqa: E402

H200_BF16_DENSE = 989e12  # FLOP/s, NVIDIA's H200 SXM datasheet (dense, without sparsity)
UTILISATION = 0.5
ADM256 = {
    "image_size": 256,
    "num_channels": 256,
    "channel_mult": (1, 1, 2, 2, 4, 4),
    "num_res_blocks": 2,
    "attention_resolutions": (8, 16, 32),
    "num_head_channels": 64,
    "out_channels": 6,
}


def photographs(count: int, width: int, height: int, quality: int, seed: int = 0) -> list[bytes]:
    """JPEGs with a photograph's statistics where it matters to a decoder: smooth regions and edges (a
    bicubically enlarged coarse field) and sensor-like noise, about ImageNet's 110 kB at 500x375, q90."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.normal(0, 1, (height // 20 + 1, width // 20 + 1, 3))
        coarse = ((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 16, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def rate(function, items, seconds: float, clock=time.process_time) -> float:
    """Items per second of `function` over `items`, repeated for at least `seconds`. The default clock is
    this process's CPU time: one thread, so items per CPU second are items per second of one core, even
    on a machine that other work shares (wall time would count the other work too)."""
    done, start = 0, clock()
    while True:
        for item in items:
            function(item)
        done += len(items)
        elapsed = clock() - start
        if elapsed >= seconds:
            return done / elapsed


def forward_flops(stop_block: int = 30) -> float:
    """FLOPs of one 256x256 image through ADM-256 up to block `stop_block` (counted on the meta device)."""
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from stages.models.blocks import block_table
    from stages.models.capture import BlockCapture
    from stages.models.unet_configs import adm_unet_config

    with torch.device("meta"):
        unet = UNet2DModel(**adm_unet_config(**ADM256))
    block = block_table(unet)[stop_block - 1]
    x, t = torch.zeros(1, 3, 256, 256, device="meta"), torch.zeros(1, device="meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), BlockCapture(unet, [block]) as capture:
        capture(x, t, {stop_block: 1})
    return float(counter.get_total_flops())


def kinds_of_input(images: list[bytes], workdir: Path) -> dict:
    """{kind: (split, readers' description)} of the same JPEGs as an image folder, wds shards and hf parquet."""
    import tarfile

    from stages.data.registry import open_dataset

    folder = workdir / "folder"
    for i, data in enumerate(images):
        path = folder / "train" / f"c{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    splits = {"folder": open_dataset(str(folder), splits=("train",))["train"]}
    order = splits["folder"]
    (workdir / "wds").mkdir()
    with tarfile.open(workdir / "wds" / "set-train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for path, label in zip(order.paths, order.labels):
            for name, data in (
                (f"{Path(path).stem}.jpg", (folder / path).read_bytes()),
                (f"{Path(path).stem}.cls", str(int(label)).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    try:
        splits["wds"] = open_dataset(f"wds:{workdir / 'wds'}", splits=("train",))["train"]
    except ImportError as missing:  # the [wds] extra (cache.extras.MissingExtraError is an ImportError)
        print(f"  (no wds: {missing})")
    try:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("  (no hf: the [hf] extra is not installed)")
        return splits
    datasets.config.HF_DATASETS_CACHE = workdir / "hf-cache"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=order.classes)})
    table = pa.table(
        {
            "image": [{"bytes": (folder / p).read_bytes(), "path": None} for p in order.paths],
            "label": [int(x) for x in order.labels],
        },
        schema=features.arrow_schema,
    )
    (workdir / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, workdir / "hf" / "data" / "train-00000-of-00001.parquet")
    splits["hf"] = open_dataset(f"hf:{workdir / 'hf'}", splits=("train",))["train"]
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--sizes", default="256,128,64", help="model input sizes")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    parser.add_argument("--device", default="cpu", help="cuda: also the batched GPU decode")
    parser.add_argument("--timesteps", default="1,3", help="timesteps per image for the cores estimate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from torchvision.io import decode_jpeg

    images = photographs(args.images, args.width, args.height, args.quality)
    print(
        f"{platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}, PIL {Image.__version__}; "
        f"{len(images)} JPEGs of {args.width}x{args.height}, q{args.quality}, "
        f"mean {np.mean([len(i) for i in images]) / 1e3:.0f} kB; one thread"
    )
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]

    def pil_decode(data):
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    same = all(np.array_equal(pil_decode(d), decode_jpeg(t).permute(1, 2, 0).numpy()) for d, t in zip(images, tensors))
    pil = rate(pil_decode, images, args.seconds)
    tv = rate(decode_jpeg, tensors, args.seconds)
    print(
        f"\ndecode only, images/s per core: PIL {pil:.0f}, torchvision decode_jpeg {tv:.0f} ({tv / pil:.2f}x); "
        f"identical pixels: {same}"
    )

    per_core = {}
    print(f"\n{'size':>5} {'path':<28} {'img/s/core':>10} {'vs exact':>9} {'max |diff|':>11} {'mean |diff|':>12}")
    for size in [int(s) for s in args.sizes.split(",")]:
        exact = [load_image("bench", size, 3, data=d) for d in images]
        for name, options in (
            ("exact (bicubic)", {}),
            ("adm resize", {"method": "adm"}),
            ("draft + bicubic", {"draft": True}),
            ("draft + adm", {"method": "adm", "draft": True}),
        ):
            speed = rate(lambda d, o=options, s=size: load_image("bench", s, 3, data=d, **o), images, args.seconds)
            reference = (
                exact
                if options.get("method") != "adm"
                else [load_image("bench", size, 3, data=d, method="adm") for d in images]
            )
            diffs = torch.stack(
                [(load_image("bench", size, 3, data=d, **options) - r).abs() for d, r in zip(images, reference)]
            )
            base = per_core.setdefault((size, "exact"), speed)
            per_core[(size, name)] = speed
            print(
                f"{size:>5} {name:<28} {speed:>10.0f} {speed / base:>8.2f}x {diffs.max():>11.4f} {diffs.mean():>12.5f}"
            )

    with tempfile.TemporaryDirectory() as workdir:
        splits = kinds_of_input(images, Path(workdir))
        print("\nthe project's exact pipeline at 256 through each kind of input's reader:")
        kinds = {}
        for kind, split in splits.items():
            rows = list(range(len(split.paths)))
            kinds[kind] = rate(lambda i, s=split: s.read(i, 256, 3), rows, args.seconds)
            print(f"  {kind:<8} {kinds[kind]:>6.0f} img/s/core ({kinds[kind] / kinds['folder']:.2f}x the folder's)")
        # what a DataLoader worker does per sample: the image, and the noise of every timestep it is run at
        from stages.extract.run import _NoisedImages

        worker = {}
        for steps in [int(s) for s in args.timesteps.split(",")]:
            for kind, split in splits.items():
                sample = _NoisedImages(
                    split,
                    {"size": 256, "channels": 3, "method": "bicubic"},
                    list(range(10, 10 + 10 * steps, 10)),
                    0,
                    (3, 256, 256),
                )
                worker[(kind, steps)] = rate(sample.__getitem__, list(range(len(split.paths))), args.seconds)
            print(
                f"  a worker's whole sample (image + {steps} noise draw(s) of 3x256x256): "
                + ", ".join(f"{kind} {worker[(kind, steps)]:.0f}" for kind in splits)
                + " samples/s/core"
            )

    if args.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(args.device)
        for batch in (32, 128):
            batches = [tensors[i : i + batch] for i in range(0, len(tensors), batch)]
            decode_jpeg(batches[0], device=device)
            torch.cuda.synchronize()
            speed = rate(lambda b: decode_jpeg(b, device=device), batches, args.seconds, time.perf_counter) * batch
            torch.cuda.synchronize()
            print(f"\nGPU decode_jpeg(device={device}), batches of {batch}: {speed:.0f} images/s (decode only)")

    flops = forward_flops(30)
    forwards = H200_BF16_DENSE * UTILISATION / flops
    print(
        f"\nADM-256 to block 30: {flops / 1e9:.0f} GFLOP per image and timestep; one H200 at {UTILISATION:.0%} of "
        f"{H200_BF16_DENSE / 1e12:.0f} TFLOP/s bf16: {forwards:.0f} forwards/s"
    )
    for steps in [int(s) for s in args.timesteps.split(",")]:
        need = forwards / steps
        print(
            f"  {steps} timestep(s) per image: {need:.0f} images/s to feed; DataLoader cores per GPU "
            "(an 8-GPU node's in brackets), from a worker's whole sample:"
        )
        for kind in kinds:
            cores = need / worker[(kind, steps)]
            print(f"    {kind:<8} {cores:5.2f} -> {math.ceil(cores)} ({8 * math.ceil(cores)})")


if __name__ == "__main__":
    main()

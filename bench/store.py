"""What the store's integrity checks cost on reads, measured side by side in one run.

    python bench/store.py                    # 16k samples x 512 channels x 2x2, float16 (64 MB)
    python bench/store.py --samples 65536

Prints the wall time of reading every chunk of one array (a) with plain zarr (decompression and
crc32c only) and a conversion to float32, as the store's reader returns it, (b) with
`FeatureStore.read_chunk` (also: completion, finite values, the store's identity per read), (c) with
`FeatureStore.read` (one call for the whole array), and the ratios.
Best of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import FeatureStore, FeatureStoreWriter, layout  # noqa: E402
from cache.writer import SplitIndex  # noqa: E402


def write(path: Path, samples: int, channels: int, chunk_samples: int) -> None:
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    settings.update(
        kind="bench",
        data={"classes": ["a", "b"]},
        noise_seed=0,
        dtype="float16",
        precision="fp32",
        chunk_samples=chunk_samples,
    )
    table = [{"number": 1, "module": "m", "adm_name": "a", "channels": channels, "resolution": 2}]
    splits = {"train": SplitIndex(np.zeros(samples, np.int64), [f"{i}.png" for i in range(samples)])}
    rng = np.random.default_rng(0)
    with FeatureStoreWriter.open(path, settings=settings, splits=splits, block_table=table) as writer:
        writer.add_arrays({1: 2}, [10], [2])
        for chunk in range(layout.num_chunks(samples, chunk_samples)):
            rows = layout.chunk_slice(chunk, samples, chunk_samples)
            values = rng.normal(size=(rows.stop - rows.start, channels, 2, 2)).astype(np.float16)
            writer.write_shard("train", chunk, {(1, 10): values})


def best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--chunk-samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.zarr"
        write(path, args.samples, args.channels, args.chunk_samples)
        store = FeatureStore.open(path)
        array = zarr.open_group(path, mode="r")["train/block1/t10"]
        chunks = store.num_chunks("train")
        plain = best(
            lambda: [array[store.chunk_rows("train", k)].astype(np.float32) for k in range(chunks)], args.repeats
        )
        checked = best(lambda: [store.read_chunk("train", 1, 10, k) for k in range(chunks)], args.repeats)
        whole = best(lambda: store.read("train", 1, 10), args.repeats)
    size = args.samples * args.channels * 4 * 2 / 1e6
    print(f"store: {args.samples} samples x {args.channels} channels x 2x2 float16 ({size:.0f} MB), {chunks} chunks")
    print(f"(a) plain zarr + float32, chunk by chunk: {plain:7.3f} s  {size / plain:8.1f} MB/s")
    print(f"(b) FeatureStore.read_chunk, every chunk: {checked:7.3f} s  {size / checked:8.1f} MB/s")
    print(f"(c) FeatureStore.read, the whole array  : {whole:7.3f} s  {size / whole:8.1f} MB/s")
    print(f"ratio (b)/(a) = {checked / plain:.2f}, (c)/(a) = {whole / plain:.2f}")


if __name__ == "__main__":
    main()

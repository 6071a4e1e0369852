"""Features for the probe sweep: read from the store, pooled, standardised, packed and batched.

`Reader` reads pooled pieces {(block, timestep, grid): (n, C, grid, grid)} chunk by chunk or whole
arrays at once; `Stats` merges per-chunk moments of the fit rows; `Layout` packs the pieces of a
pass's input sets for the heads (flat groups for linear/MLP banks, grids for CNN/attention);
`MemorySource` keeps every train row (in GPU memory when it fits there), `StreamSource` reads a
window of chunks at a time; `epoch_schedule` is the one batch order both follow. Every mode pools,
standardises and batches with the same arithmetic, so the data mode only decides what is cached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cache.reader import FeatureStore
from stages.probe import heads as H

if TYPE_CHECKING:
    from stages.probe.run import Combo, ProbeSettings, Samples

log = logging.getLogger("stages.probe.run")


# -- reading and standardising -------------------------------------------------------------------------
class Reader:
    """Raw pooled pieces of store chunks: {(block, timestep, grid): (n, C, grid, grid) float32}."""

    def __init__(self, store: FeatureStore, pieces: Sequence[tuple[int, int, int]], settings: ProbeSettings):
        self.store, self.pieces, self.settings = store, sorted(set(pieces)), settings
        self.arrays = sorted({(b, t) for b, t, _ in self.pieces})
        self._lazy = {}

    def lazy(self, split: str, block: int, timestep: int):
        key = (split, block, timestep)
        if key not in self._lazy:
            self._lazy[key] = self.store.read_dask(split, block, timestep, None, allow_incomplete=self.settings.allow_incomplete)
        return self._lazy[key]

    def chunk_rows(self, split: str, chunk: int) -> slice:
        n, cs = self.store.num_samples(split), int(self.store.attrs["chunk_samples"])
        return slice(chunk * cs, min((chunk + 1) * cs, n))

    def num_chunks(self, split: str) -> int:
        return -(-self.store.num_samples(split) // int(self.store.attrs["chunk_samples"]))

    def read(self, split: str, chunks: Sequence[int]) -> list[dict]:
        """Per chunk, every piece; one parallel read for all arrays of all chunks."""
        import dask

        parts = [self.lazy(split, b, t)[self.chunk_rows(split, k)] for k in chunks for b, t in self.arrays]
        values = dask.compute(*parts, scheduler="threads", num_workers=self.settings.read_threads)
        out = []
        for i, _ in enumerate(chunks):
            raw = dict(zip(self.arrays, values[i * len(self.arrays) : (i + 1) * len(self.arrays)]))
            # Pool each chunk on its own in every mode, so that cached and streamed features are equal.
            out.append({(b, t, g): pool_grid(raw[(b, t)], g) for b, t, g in self.pieces})
        return out


    def whole_arrays(self, split: str):
        """(array, [pieces of chunk k for every k]) per (block, timestep), each array read in one go.

        Several arrays are read at once (threads); chunks are pooled one by one as in `read`, so the
        values are the same. Used where everything is held in memory anyway.
        """
        from concurrent.futures import ThreadPoolExecutor

        def load(pair):
            raw = self.store.read(split, *pair, None, allow_incomplete=self.settings.allow_incomplete)
            grids = [g for b, t, g in self.pieces if (b, t) == pair]
            return pair, [{(*pair, g): pool_grid(raw[self.chunk_rows(split, k)], g) for g in grids}
                          for k in range(self.num_chunks(split))]

        with ThreadPoolExecutor(self.settings.read_threads) as pool:
            yield from pool.map(load, self.arrays)

    def chunks(self, split: str, chunks: Sequence[int], *, whole: bool):
        """(k, pieces of chunk k) for the given chunks, read whole arrays at once (`whole`) or chunk by chunk."""
        if not whole:
            for k in chunks:
                yield k, self.read(split, [k])[0]
            return
        merged = [{} for _ in range(self.num_chunks(split))]
        for _, per_chunk in self.whole_arrays(split):
            for k, pieces in enumerate(per_chunk):
                merged[k].update(pieces)
        for k in chunks:
            yield k, merged[k]


def pool_grid(x: np.ndarray, grid: int) -> np.ndarray:
    """(n, C, h, w) -> (n, C, grid, grid) float32: torch's adaptive average pooling (the bins the store
    promises, `cache.pooling`), vectorised; numpy's multi-axis mean is several times slower."""
    if x.shape[-1] == grid and x.shape[-2] == grid:
        return np.ascontiguousarray(x, dtype=np.float32)
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), grid).numpy()


class Stats:
    """Per-feature mean and std of each piece over the fit rows, merged chunk by chunk (Chan et al.) in float64.

    Each chunk's moments are taken on `device` (the one the heads train on), wherever the features are
    kept, so every data mode standardises with the same numbers."""

    def __init__(self, per_channel: bool, device: torch.device = torch.device("cpu")):
        self.per_channel, self.device = per_channel, device
        self.n, self.mean, self.m2 = {}, {}, {}

    def update(self, pieces: dict, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        for key, x in pieces.items():
            x = torch.as_tensor(x)
            x = x[torch.as_tensor(rows, device=x.device)].to(self.device)
            # float32 in: the CPU kernel accumulates in double, so a float64 copy would only cost time
            var, mb = torch.var_mean(x, dim=0, correction=0)
            nb, mb, m2b = len(rows), mb.double().cpu().numpy(), (var.double() * len(rows)).cpu().numpy()
            if key not in self.n:
                self.n[key], self.mean[key], self.m2[key] = nb, mb, m2b
                continue
            na = self.n[key]
            delta = mb - self.mean[key]
            total = na + nb
            self.mean[key] = self.mean[key] + delta * nb / total
            self.m2[key] = self.m2[key] + m2b + delta**2 * na * nb / total
            self.n[key] = total

    def finish(self) -> dict:
        """{piece: (mean, std)} float32, (C, g, g) per feature or (C, 1, 1) per channel; std 0 becomes 1."""
        out = {}
        for key in self.n:
            mean, var = self.mean[key], self.m2[key] / self.n[key]
            if self.per_channel:  # pooled over cells: mean of cell means, law of total variance
                channel_mean = mean.mean(axis=(1, 2), keepdims=True)
                var = (var + (mean - channel_mean) ** 2).mean(axis=(1, 2), keepdims=True)
                mean = channel_mean
            std = np.sqrt(var)
            std = np.where(std > 1e-6 * max(1.0, float(np.abs(mean).max())), std, 1.0)
            out[key] = (mean.astype(np.float32), std.astype(np.float32))
        return out


def standardise(x: np.ndarray | torch.Tensor, mean: np.ndarray, std: np.ndarray) -> None:
    """In place, on the CPU or a GPU; the one arithmetic used for cached and streamed features alike."""
    x = torch.as_tensor(x)
    x.sub_(torch.as_tensor(mean, device=x.device)).div_(torch.as_tensor(std, device=x.device))


class Layout:
    """How the features of a pass's input sets are packed for the bank.

    flat: per group of equal-size input sets one tensor (G, n, D), inputs flattened and concatenated;
    grid: per input set a list of (n, C, g, g) tensors.
    """

    def __init__(self, combos: list[Combo], flat: bool):
        self.combos, self.flat = combos, flat
        self.groups = H.group_by_dim([c.dim for c in combos]) if flat else [[i] for i in range(len(combos))]

    def allocate(self, n: int, device: torch.device | str = "cpu") -> list:
        if self.flat:
            return [torch.empty(len(g), n, self.combos[g[0]].dim, device=device) for g in self.groups]
        return [[torch.empty(n, c, g, g, device=device) for c, g in combo.shapes] for combo in self.combos]

    def nbytes(self, n: int) -> int:
        return 4 * n * sum(c.dim for c in self.combos)

    def fill(self, packed: list, rows: slice, pieces: dict) -> None:
        for gi, group in enumerate(self.groups):
            for j, ci in enumerate(group):
                combo, offset = self.combos[ci], 0
                for piece, (c, g) in zip(combo.pieces, combo.shapes):
                    if piece not in pieces:  # filled array by array
                        offset += c * g * g
                        continue
                    x = torch.as_tensor(pieces[piece])
                    if self.flat:
                        packed[gi][j, rows, offset : offset + c * g * g] = x.reshape(len(x), -1)
                        offset += c * g * g
                    else:
                        packed[ci][combo.pieces.index(piece)][rows] = x

    def standardise(self, packed: list, stats: dict) -> None:
        for gi, group in enumerate(self.groups):
            for j, ci in enumerate(group):
                combo, offset = self.combos[ci], 0
                for i, (piece, (c, g)) in enumerate(zip(combo.pieces, combo.shapes)):
                    mean, std = stats[piece]
                    if self.flat:
                        standardise(packed[gi][j, :, offset : offset + c * g * g], mean.reshape(-1), std.reshape(-1))
                        offset += c * g * g
                    else:
                        standardise(packed[ci][i], mean, std)

    def take(self, packed: list, index: np.ndarray, device: torch.device) -> list:
        """The rows `index` of every tensor, on `device` (gathered where the features are kept)."""
        home = packed[0].device if self.flat else packed[0][0].device
        index = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(home)
        if self.flat:
            return [t.index_select(1, index).to(device, non_blocking=True) for t in packed]
        return [[t.index_select(0, index).to(device, non_blocking=True) for t in inputs] for inputs in packed]

    def combo_matrix(self, packed: list, ci: int) -> np.ndarray:
        """(n, D) features of one flat input set (a view)."""
        gi = next(g for g, members in enumerate(self.groups) if ci in members)
        return packed[gi][self.groups[gi].index(ci)].numpy()


class MemorySource:
    """Every train row of the pass's pieces, read once, standardised in place.

    On a GPU the rows are kept in its memory when they fit there: statistics, standardisation and
    every batch's gather then run on the device, and no batch crosses the bus."""

    def __init__(self, reader: Reader, layout: Layout, samples: Samples, per_channel: bool,
                 device: torch.device = torch.device("cpu")):
        n = len(samples.train_labels)
        home = device if device.type == "cuda" and fits_on(device, layout.nbytes(n)) else torch.device("cpu")
        self.layout, self.packed = layout, layout.allocate(n, home)
        stats, fit = Stats(per_channel, device), samples.fit_mask()
        for _, per_chunk in reader.whole_arrays("train"):
            for k, pieces in enumerate(per_chunk):
                rows = reader.chunk_rows("train", k)
                pieces = {key: torch.from_numpy(x).to(home) for key, x in pieces.items()}
                layout.fill(self.packed, rows, pieces)
                stats.update(pieces, np.flatnonzero(fit[rows]))
        self.stats = stats.finish()
        layout.standardise(self.packed, self.stats)

    def window(self, chunks: Sequence[int]) -> tuple[list, callable]:
        return self.packed, lambda rows: rows


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `nbytes` of features leave a GPU a quarter of its free memory for the heads."""
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.75 * free:
        log.info("features (%s) kept in host memory: the GPU has %s free", size_text(nbytes), size_text(free))
        return False
    return True


class StreamSource:
    """Reads the train chunks of each window from the store, standardised with statistics from a first pass."""

    def __init__(self, reader: Reader, layout: Layout, samples: Samples, per_channel: bool,
                 device: torch.device = torch.device("cpu")):
        self.reader, self.layout = reader, layout
        stats, fit = Stats(per_channel, device), samples.fit_mask()
        for k in range(reader.num_chunks("train")):
            (pieces,) = reader.read("train", [k])
            stats.update(pieces, np.flatnonzero(fit[reader.chunk_rows("train", k)]))
        self.stats = stats.finish()

    def window(self, chunks: Sequence[int]) -> tuple[list, callable]:
        spans = [self.reader.chunk_rows("train", k) for k in chunks]
        packed = self.layout.allocate(sum(s.stop - s.start for s in spans))
        shift, offset = np.zeros(self.reader.num_chunks("train"), np.int64), 0
        for k, span, pieces in zip(chunks, spans, self.reader.read("train", list(chunks))):
            for key, (mean, std) in self.stats.items():
                standardise(pieces[key], mean, std)
            self.layout.fill(packed, slice(offset, offset + span.stop - span.start), pieces)
            shift[k] = offset - span.start
            offset += span.stop - span.start
        cs = int(self.reader.store.attrs["chunk_samples"])
        return packed, lambda rows: rows + shift[rows // cs]


# -- the schedule ------------------------------------------------------------------------------------
@dataclass
class Window:
    chunks: list[int]
    batches: list[np.ndarray]  # train-split row indices


def epoch_schedule(samples: Samples, window_chunks: int, batch_size: int, seed: int, epoch: int) -> list[Window]:
    """Chunks in a seeded random order, cut into windows; fit rows shuffled within a window, cut into batches
    of about `batch_size` (a window's rows are split evenly, so no batch is a tiny remainder)."""
    rng = np.random.default_rng([seed, 1, epoch])
    n, cs = len(samples.train_labels), samples.chunk_samples
    order = rng.permutation(-(-n // cs))
    chunk_of_fit = samples.fit // cs
    windows = []
    for start in range(0, len(order), window_chunks):
        chunks = [int(k) for k in order[start : start + window_chunks]]
        rows = samples.fit[np.isin(chunk_of_fit, chunks)]
        if len(rows) == 0:
            continue
        rows = rows[rng.permutation(len(rows))]
        count = max(1, int(round(len(rows) / batch_size)))
        windows.append(Window(chunks, np.array_split(rows, count)))
    return windows


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024

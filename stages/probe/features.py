"""Features for the probe sweep: read from the store, pooled, standardised, packed and batched.

`Reader` reads pooled pieces {(block, timestep, grid): (n, C, grid, grid)} of store chunks, many
(array, chunk) reads at once; `Stats` merges per-chunk moments of the fit rows; `Layout` packs the
pieces of a pass's input sets for the heads (flat groups for linear/MLP banks, grids for
CNN/attention); `MemorySource` keeps every train row (in GPU memory when it fits there),
`StreamSource` reads a window of chunks at a time, of any split. Every mode pools, standardises and
batches with the same arithmetic, so the data mode only decides what is cached.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cache.pooling import adaptive_avg_pool
from cache.reader import FeatureStore
from cache.text import format_bytes
from stages.probe.banks import group_by_dim
from stages.probe.plan import Combo, Rows, view_choice

log = logging.getLogger(__name__)


# -- reading and standardising -------------------------------------------------------------------------
class Reader:
    """Pooled pieces of store chunks: {(block, timestep, grid): (n, C, grid, grid) float32}."""

    def __init__(
        self,
        store: FeatureStore,
        pieces: Sequence[tuple[int, int, int]],
        *,
        allow_incomplete: bool = False,
        threads: int = 4,
    ):
        self.store, self.pieces = store, sorted(set(pieces))
        self.allow_incomplete, self.threads = allow_incomplete, threads
        self.arrays = sorted({(b, t) for b, t, _ in self.pieces})

    def read(self, split: str, chunks: Sequence[int]) -> list[dict]:
        """Per chunk, every piece; the (array, chunk) reads run in parallel threads."""
        jobs = [(k, b, t) for k in chunks for b, t in self.arrays]

        def load(job):
            k, b, t = job
            return self.store.read_chunk(split, b, t, k, allow_incomplete=self.allow_incomplete)

        with ThreadPoolExecutor(self.threads) as pool:
            raw = dict(zip(jobs, pool.map(load, jobs)))
        # Pool each chunk on its own in every mode, so that cached and streamed features are equal.
        return [{(b, t, g): adaptive_avg_pool(raw[(k, b, t)], g) for b, t, g in self.pieces} for k in chunks]

    def chunks(self, split: str, chunks: Sequence[int]) -> Iterator[tuple[int, dict]]:
        """(k, pieces of chunk k) for the given chunks, read a few chunks at a time."""
        chunks = list(chunks)
        step = max(1, 4 * self.threads // max(1, len(self.arrays)))
        for start in range(0, len(chunks), step):
            group = chunks[start : start + step]
            yield from zip(group, self.read(split, group))


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
        self.groups = group_by_dim([c.dim for c in combos]) if flat else [[i] for i in range(len(combos))]

    def allocate(self, n: int, device: torch.device | str = "cpu") -> list:
        if self.flat:
            return [torch.empty(len(g), n, self.combos[g[0]].dim, device=device) for g in self.groups]
        return [[torch.empty(n, c, g, g, device=device) for c, g in combo.shapes] for combo in self.combos]

    def head(self, packed: list, n: int) -> list:
        """Views of the first `n` rows of every tensor of `packed`."""
        if self.flat:
            return [t[:, :n] for t in packed]
        return [[t[:n] for t in inputs] for inputs in packed]

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


def fit_statistics(
    reader: Reader, split: str, fit_mask: np.ndarray, per_channel: bool, device: torch.device = torch.device("cpu")
) -> dict:
    """{piece: (mean, std)} over the fit rows of `split`, read chunk by chunk (a first pass of stream mode)."""
    stats = Stats(per_channel, device)
    for k, pieces in reader.chunks(split, range(reader.store.num_chunks(split))):
        stats.update(pieces, np.flatnonzero(fit_mask[reader.store.chunk_rows(split, k)]))
    return stats.finish()


def identity_statistics(reader: Reader) -> dict:
    """{piece: (0, 1)}: raw features (the paper's recipe), through the same code as standardised ones."""
    store = reader.store
    return {
        (b, t, g): (
            np.zeros((store.block_info(b)["channels"], g, g), np.float32),
            np.ones((store.block_info(b)["channels"], g, g), np.float32),
        )
        for b, t, g in reader.pieces
    }


class Views:
    """Which stored view each train row reads per epoch: `view_choice(seed, epoch, index, count)`; view 0
    (the centre view) outside training (epoch None)."""

    def __init__(self, count: int = 1, seed: int = 0):
        self.count, self.seed = count, seed

    def of(self, rows: np.ndarray, epoch: int | None) -> np.ndarray:
        if epoch is None or self.count == 1:
            return np.zeros(len(rows), np.int64)
        return view_choice(self.seed, epoch, rows, self.count)


class MemorySource:
    """Every row of a split's pieces, read once, standardised in place with statistics of `fit_mask` rows
    (or kept raw); with several `views`, every view's rows (view v at rows v*N...), the statistics of view 0.

    On a GPU the rows are kept in its memory when they fit there: statistics, standardisation and
    every batch's gather then run on the device, and no batch crosses the bus."""

    def __init__(
        self,
        reader: Reader,
        layout: Layout,
        split: str,
        fit_mask: np.ndarray,
        per_channel: bool,
        device: torch.device = torch.device("cpu"),
        *,
        raw: bool = False,
        views: Views | None = None,
    ):
        store = reader.store
        n = store.num_samples(split)
        self.n, self.views = n, views or Views()
        total = n * self.views.count
        home = device if device.type == "cuda" and fits_on(device, layout.nbytes(total)) else torch.device("cpu")
        self.layout, self.packed = layout, layout.allocate(total, home)
        stats = Stats(per_channel, device)
        for view in range(self.views.count):
            name = store.view_split(split, view)
            for k, pieces in reader.chunks(name, range(store.num_chunks(split))):
                rows = store.chunk_rows(split, k)
                pieces = {key: torch.from_numpy(x).to(home) for key, x in pieces.items()}
                layout.fill(self.packed, slice(rows.start + view * n, rows.stop + view * n), pieces)
                if view == 0 and not raw:
                    stats.update(pieces, np.flatnonzero(fit_mask[rows]))
        self.stats = identity_statistics(reader) if raw else stats.finish()
        if not raw:
            layout.standardise(self.packed, self.stats)

    def window(self, chunks: Sequence[int], epoch: int | None = None) -> tuple[list, callable]:
        """(packed rows, rows -> their positions): in `epoch` each train row at its view, else at view 0."""
        if self.views.count == 1:
            return self.packed, lambda rows: rows
        return self.packed, lambda rows: rows + self.n * self.views.of(rows, epoch)


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `nbytes` of features leave a GPU a quarter of its free memory for the heads."""
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.75 * free:
        log.info("features (%s) kept in host memory: the GPU has %s free", format_bytes(nbytes), format_bytes(free))
        return False
    return True


class StreamSource:
    """Reads the chunks of each window of `split` from the store, standardised with the given statistics;
    in a training epoch with several `views`, the window's chunks of every view.

    Memory: one window of packed features, in a buffer allocated once and refilled for every window (a
    window is done with when the next is asked for), plus the few chunks `Reader.chunks` reads at a time.
    A new buffer per window would hold two windows at once (the caller's last one is still referenced
    while the next is filled), and reading a whole window before packing it a third copy."""

    def __init__(self, reader: Reader, layout: Layout, split: str, stats: dict, *, views: Views | None = None):
        self.reader, self.layout, self.split, self.stats = reader, layout, split, stats
        self.views = views or Views()
        self.buffer, self.capacity = None, 0

    def window(self, chunks: Sequence[int], epoch: int | None = None) -> tuple[list, callable]:
        store = self.reader.store
        count = self.views.count if epoch is not None else 1
        spans = [store.chunk_rows(self.split, k) for k in chunks]
        size = sum(s.stop - s.start for s in spans)
        packed = self.rows(size * count)
        shift, offset = np.zeros(store.num_chunks(self.split), np.int64), 0
        for view in range(count):
            name = store.view_split(self.split, view)
            for (k, pieces), span in zip(self.reader.chunks(name, list(chunks)), spans):
                for key, (mean, std) in self.stats.items():
                    standardise(pieces[key], mean, std)
                self.layout.fill(packed, slice(offset, offset + span.stop - span.start), pieces)
                if view == 0:
                    shift[k] = offset - span.start
                offset += span.stop - span.start
        cs = store.chunk_samples
        if count == 1:
            return packed, lambda rows: rows + shift[rows // cs]
        return packed, lambda rows: rows + shift[rows // cs] + size * self.views.of(rows, epoch)

    def rows(self, n: int) -> list:
        """The first `n` rows of the window buffer, grown (never shrunk) to hold them."""
        if n > self.capacity:
            self.buffer = None  # dropped before the larger one is allocated
            self.buffer, self.capacity = self.layout.allocate(n), n
        return self.layout.head(self.buffer, n)


def packed_rows(reader: Reader, layout: Layout, rows: Rows, stats: dict) -> list:
    """The standardised features of `rows` (in their order), packed by `layout`, read chunk by chunk."""
    cs = reader.store.chunk_samples
    packed = layout.allocate(len(rows))
    offset = 0
    chunks = rows.by_chunk(cs)
    for (k, index), (_, pieces) in zip(chunks, reader.chunks(rows.split, [k for k, _ in chunks])):
        local = index - k * cs
        for key, (mean, std) in stats.items():
            standardise(pieces[key], mean, std)
        layout.fill(packed, slice(offset, offset + len(local)), {key: value[local] for key, value in pieces.items()})
        offset += len(local)
    return packed

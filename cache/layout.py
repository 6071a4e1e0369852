"""Where everything lives inside a store (the README's "Store layout" describes the same).

    <store>/zarr.json                      root group; attributes = the recorded settings
    <store>/<split>/labels                 (N,) int64 class index
    <store>/<split>/paths                  (N,) str, image path relative to the data root
    <store>/<split>/block<B>/t<T>          (N, C, g, g) features of block B at timestep T
    <store>/_progress/<split>/block<B>/t<T>  (n_chunks,) uint8, 1 once sample-chunk k is written

Samples are in sample-index order (the order of `paths`). Arrays of one block share a group so that
`xarray.open_zarr(store, group="<split>/block<B>")` sees every timestep of it as one data set.
"""

FORMAT = "diffusion-feature-cache/1"
PROGRESS = "_progress"
DIMENSIONS = ("sample", "channel", "y", "x")

# Settings that decide what every stored number is; a store only accepts writes that agree on all.
IDENTITY_KEYS = ("kind", "model", "data", "preprocessing", "noise_seed", "dtype", "precision", "chunk_samples")


def block_group(split: str, block: int) -> str:
    return f"{split}/block{block}"


def feature_path(split: str, block: int, timestep: int) -> str:
    return f"{split}/block{block}/t{timestep}"


def progress_path(split: str, block: int, timestep: int) -> str:
    return f"{PROGRESS}/{split}/block{block}/t{timestep}"


def num_chunks(num_samples: int, chunk_samples: int) -> int:
    return -(-num_samples // chunk_samples)


def chunk_slice(chunk: int, num_samples: int, chunk_samples: int) -> slice:
    return slice(chunk * chunk_samples, min((chunk + 1) * chunk_samples, num_samples))

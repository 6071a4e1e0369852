"""Repairing a store completely: the store alone says how (its recipe), so one command needs nothing else.

A store records its *recipe*, the extraction request that made it (`stages.extract.plan.recipe`:
model, data, class and image selections, noise seed, dtype, precision, batch size, chunking, views,
with local paths made absolute; the pixel baseline records its own), from the first write on: a
store left unfinished by a killed run (even one killed while replacing a store) still says how to
finish it. `repair_store`:

1. writes a damaged root zarr.json again from the copy of the settings the store keeps
   (`FeatureStoreWriter.restore_settings`), verifies every finished shard and marks what is damaged,
   missing or foreign unfinished (`FeatureStoreWriter.repair`; a store never finished being made is
   rebuilt from its recipe instead);
2. recomputes every unfinished shard, labels and paths included, by running the extraction again
   with the recipe, once per group of arrays extracted together (the same write sets, so the same
   batches and bytes as the uninterrupted run);
3. verifies the store again: it is whole, or the error says what is still wrong.

Nothing is recomputed, and no model or data set needed, when nothing is damaged or unfinished.

A store made before stores recorded their recipe is repaired from what its settings record instead
(`recipe_from_settings`: the model and data it names, its noise seed, dtype, chunking ...). That is
checked before anything is written: the extraction refuses a store whose identity differs from what
it would make, and the repair then says the store cannot be remade from its settings alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from cache import FeatureStore
from cache.errors import REPLACE, RERUN, IncompleteStoreError, IntegrityError, StoreError, StoreMismatchError
from cache.integrity import Damage, find_damage, finished_attrs, read_root_attrs
from cache.manifest import Manifest
from cache.pooling import derivable, stored_grid
from cache.selection import base_splits
from cache.storage import Location
from cache.writer import FeatureStoreWriter
from stages.extract.plan import ExtractConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairOutcome:
    found: list[Damage]  # what verification found before the repair
    recomputed: bool  # whether an extraction ran


def config_from_recipe(record: dict, location: Location, **changes) -> ExtractConfig:
    """The extraction a recipe records, into the store at `location` (`changes`: e.g. which blocks)."""
    known = {f.name for f in fields(ExtractConfig)}
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in record.items() if key in known}
    return ExtractConfig(**{**values, "out": location.url, "storage_options": dict(location.options), **changes})


def repair_store(location: Location | str, *, progress: bool = True) -> RepairOutcome:
    """Make the store at `location` whole (module docstring)."""
    from stages.extract.run import run_extract

    def run(config: ExtractConfig) -> None:
        run_extract(config, progress=progress)

    location = Location.parse(location)
    restored = FeatureStoreWriter.restore_settings(location)
    try:
        attrs = finished_attrs(location)
    except IncompleteStoreError:
        record = read_root_attrs(location).get("recipe")
        if record is None:
            raise StoreError(
                f"{location} was never finished being made, and does not record how it was made "
                "(made before stores recorded their recipe)",
                store=location,
                remedy=REPLACE,
            ) from None
        log.warning("%s was never finished being made: making it again from its recipe", location)
        _remake(record, location, run)
        return RepairOutcome([Damage("zarr.json", None, "was never finished being made")], True)
    found = FeatureStoreWriter.repair(location)
    store = FeatureStore.open(location)
    if not found and not store.missing():
        return RepairOutcome(restored, False)
    record = attrs.get("recipe") or recipe_from_settings(attrs)
    if record is None:
        raise StoreError(
            f"{location} does not record how it was made (made before stores recorded their recipe, and "
            "its settings do not name its model and data), so its damaged or unfinished parts, now "
            "marked unfinished, cannot be recomputed from it alone",
            store=location,
            remedy=RERUN,
            damage=found,
        )
    if attrs.get("recipe") is None:
        log.warning(
            "%s was made before stores recorded their recipe: recomputing with what its settings record, %s",
            location,
            record,
        )
    if record.get("maker") == "pixels":
        _remake(record, location, run)
    try:
        for blocks, timesteps, pools in [] if record.get("maker") else _groups(store):
            run(config_from_recipe(record, location, blocks=blocks, timesteps=timesteps, pools=pools))
    except StoreMismatchError as error:  # only a recipe read from the settings can differ: nothing was written
        raise StoreError(
            f"{location} does not record how it was made (made before stores recorded their recipe), "
            f"and what its settings record makes another store ({error}); its damaged or unfinished "
            "parts, now marked unfinished, cannot be recomputed from it alone",
            store=location,
            remedy=RERUN,
            damage=found,
        ) from None
    found = restored + found
    left = find_damage(location, full=True)
    unfinished = FeatureStore.open(location).missing()
    if left or unfinished:
        names = [d.describe(str(location)) for d in left[:5]] + [f"{k} is unfinished" for k in list(unfinished)[:5]]
        raise IntegrityError(
            f"{location} is still damaged after its repair: " + "; ".join(names),
            store=location,
            damage=left,
            remedy=REPLACE,
        )
    return RepairOutcome(found, True)


def recipe_from_settings(attrs: dict) -> dict | None:
    """The recipe of a store made before stores recorded theirs, as far as its settings say (module docstring):
    None where they do not name the model and the image folder it was made from (the descriptive settings
    `model_source` and `data_root`), or where its data were a selection or a packed kind (not recorded by name)."""
    model, data, identity = attrs.get("model_source"), attrs.get("data_root"), attrs.get("data") or {}
    if not model or not data or any(key in identity for key in ("kind", "class_list", "subset")):
        return None
    manifest = Manifest.parse(attrs, str(data))
    views = attrs.get("views") or {}
    return {
        "model": model,
        "data": data,
        "noise_seed": attrs.get("noise_seed") or 0,
        "dtype": attrs["dtype"],
        "precision": attrs["precision"],
        "chunk_samples": manifest.chunk_samples,
        "shard_samples": manifest.shard_samples,
        "ensemble": int((attrs.get("model") or {}).get("ensemble", 1)),
        "views": int(views.get("count", 1)),
        "view_splits": list(views.get("splits", ["train"])),
        "splits": base_splits(manifest),
        "blocks": sorted(manifest.features),
        "timesteps": sorted({t for _, t in manifest.arrays()}),
        "pools": list(manifest.pools),
    }


def _remake(record: dict, location: Location, run) -> None:
    """Run the recipe as it was recorded: an extraction, or the pixel baseline (`maker`: "pixels")."""
    if record.get("maker") == "pixels":
        from stages.extract.pixels import write_pixel_store

        arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k != "maker"}
        write_pixel_store(arguments.pop("data"), location.url, **arguments)
        return
    run(config_from_recipe(record, location))


def _groups(store: FeatureStore) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(blocks, timesteps, pools) of each extraction that remakes the store's arrays: blocks stored at the
    same timesteps go together (as the runs that made them did, so the same write sets), asking for the
    store's pools where those give every block its stored grid, else one run per grid."""
    by_timesteps: dict[tuple, list[int]] = {}
    for block in store.blocks:
        timesteps = tuple(sorted(store.manifest.features[block].timesteps))
        by_timesteps.setdefault(timesteps, []).append(block)
    groups = []
    for timesteps, blocks in by_timesteps.items():
        info = {b: store.block_info(b) for b in blocks}
        pools = store.manifest.pools
        if pools and all(stored_grid(i["resolution"], list(pools)) == i["grid"] for i in info.values()):
            groups.append((tuple(sorted(blocks)), timesteps, pools))
            continue
        by_grid: dict[tuple, list[int]] = {}
        for b, i in info.items():
            by_grid.setdefault((i["grid"], i["resolution"]), []).append(b)
        for (grid, resolution), members in by_grid.items():
            chosen = tuple(p for p in pools if derivable(grid, resolution, p)) or (grid,)
            groups.append((tuple(sorted(members)), timesteps, chosen))
    return groups

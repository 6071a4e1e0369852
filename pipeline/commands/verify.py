"""`pipeline verify`: check (and with --repair mark for recomputation) a store's finished shards."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@click.option("--store", required=True, help="The feature store to check (a directory or an object-store URL).")
@options.storage_option
@click.option("--repair", is_flag=True,
              help="Rebuild damaged completion flags and mark damaged chunks unfinished, for `pipeline extract` to "
                   "recompute.")
def verify(store: str, storage_options, repair: bool) -> None:
    """Decode and check every finished shard of a store: checksums, missing objects, non-finite values, flags."""
    from cache import FeatureStoreWriter
    from cache.integrity import find_damage
    from cache.storage import Location

    location = Location.parse(store, storage_options)
    damage = FeatureStoreWriter.repair(location) if repair else find_damage(location, full=True)
    for item in damage:
        click.echo(item.describe(store))
    if not damage:
        click.echo(f"{store}: every finished shard verifies")
    elif repair:
        click.echo(f"{len(damage)} problem(s) repaired: damaged chunks are marked unfinished; run `pipeline extract` "
                   "with the store's settings (or `dvc repro`) to recompute them")
    else:
        raise click.ClickException(f"{store}: {len(damage)} problem(s); `pipeline verify --store {store} --repair` "
                                   "marks them for `pipeline extract` to recompute")

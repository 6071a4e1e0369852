"""`pipeline verify`: check a store's finished shards, labels and paths; with --repair, make the store whole."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@click.option("--store", required=True, help="The feature store to check (a directory or an object-store URL).")
@options.storage_option
@click.option(
    "--repair",
    is_flag=True,
    help="Repair what is found: damaged, missing or foreign shards (and labels, paths, file records) are "
    "recomputed from the model and data the store records; a store left unfinished is finished.",
)
def verify(store: str, storage_options, repair: bool) -> None:
    """Decode and check every finished shard of a store: checksums, digests, missing objects, non-finite values,
    flags, labels and paths; with --repair, make the store whole (docs/store-format.md)."""
    from cache import FeatureStore
    from cache.integrity import find_damage
    from cache.storage import Location
    from pipeline.advice import repair_command

    location = Location.parse(store, storage_options)
    if repair:
        from stages.extract.repair import repair_store

        outcome = repair_store(location)
        for item in outcome.found:
            click.echo(item.describe(store))
        click.echo(
            f"{store}: repaired; every finished shard verifies"
            if outcome.recomputed or outcome.found
            else f"{store}: every finished shard verifies, nothing to repair"
        )
        return
    damage = find_damage(location, full=True)
    for item in damage:
        click.echo(item.describe(store))
    if damage:
        raise click.ClickException(
            f"{store}: {len(damage)} problem(s). To repair it, run: `{repair_command(location)}`"
        )
    click.echo(f"{store}: every finished shard verifies")
    unfinished = FeatureStore.open(location).missing()
    if unfinished:
        click.echo(
            f"{len(unfinished)} array(s) have unfinished shards (a run stopped before it finished); "
            f"to finish them, run: `{repair_command(location)}`"
        )

"""`pipeline pixels`: the raw-pixel baseline as a feature store."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@click.option("--data", required=True, help=options.DATA_HELP)
@click.option("--classes", default=None, help=options.CLASSES_HELP)
@click.option("--subset", default=None, help=options.SUBSET_HELP)
@click.option("--out", required=True, help="The pixel store to write.")
@click.option("--model", default=None, help="Take image size and channels from this model (as its extraction does).")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Image size, without --model.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="1 or 3, without --model.")
@click.option("--pool", "pools", type=options.POOLS, default=None, help="Pool sizes [default: the full image].")
@click.option(
    "--splits",
    type=options.NAMES,
    default=None,
    help="Comma list of splits [default: the data set's official splits; an image folder's train,val].",
)
@click.option("--overwrite", is_flag=True, help="Replace a store made with other settings.")
def pixels(data, classes, subset, out, model, size, channels, pools, splits, overwrite) -> None:
    """Write the raw-pixel baseline as a feature store (block 0, timestep 0) for the probe stage."""
    from stages.extract.pixels import write_pixel_store
    from stages.models.kinds import load_feature_model

    if model is not None:  # the size and channels the model's extraction reads its images at
        read = load_feature_model(model, weights=False).image_options()
        size, channels = read["size"], read["channels"]
    if size is None or channels is None:
        raise click.UsageError("give --model, or both --size and --channels")
    write_pixel_store(
        data,
        out,
        size=int(size),
        channels=int(channels),
        pools=pools,
        splits=splits,
        overwrite=overwrite,
        classes=classes,
        subset=subset,
    )
    click.echo(f"wrote the pixel store {out}")

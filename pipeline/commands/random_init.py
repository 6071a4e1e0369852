"""`pipeline random-init`: the untrained baseline of a model."""

from __future__ import annotations

import click

from pipeline import options


@click.command("random-init")
@options.model_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the untrained copy.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    help="Initialisation seed (the training seed gives its starting point).",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier `pipeline random-init` output in --out.")
def random_init(model: str, out: str, seed: int, overwrite: bool) -> None:
    """Save a randomly initialised U-Net with MODEL's exact config and scheduler: the no-pretraining baseline."""
    from stages.pretrain.random_init import random_init_copy

    record = random_init_copy(model, out, seed=seed, overwrite=overwrite)
    click.echo(f"wrote a random-init copy of {model} ({record['parameters']} parameters, seed {seed}) to {out}")

"""`pipeline blocks`: a model's block table."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@options.model_option
def blocks(model: str) -> None:
    """Print the block table of a model: number, module, ADM name, channels, resolution."""
    from stages.models.blocks import format_table
    from stages.models.kinds import load_feature_model

    loaded = load_feature_model(model, weights=False)
    click.echo(
        format_table(
            loaded.block_table(), latent_factor=getattr(loaded, "vae_factor", None), title=loaded.input_summary()
        )
    )

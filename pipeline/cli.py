"""The `pipeline` command: wiring only; the work lives in `stages/`."""

from __future__ import annotations

import click

from pipeline import options


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Extract diffusion U-Net features once into a Zarr cache, then sweep probes over them."""


@main.command()
@options.model_option
def blocks(model: str) -> None:
    """Print the block table of a model: number, module, ADM name, channels, resolution."""
    from stages.blocks import block_table, format_table
    from stages.models import load_model

    loaded = options.load_or_fail(load_model, model)
    click.echo(format_table(block_table(loaded.unet)))

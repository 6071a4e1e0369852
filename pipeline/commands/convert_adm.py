"""`pipeline convert-adm`: an OpenAI guided-diffusion checkpoint as a UNet2DModel directory."""

from __future__ import annotations

import click


@click.command("convert-adm")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--flags",
    required=True,
    help="The MODEL_FLAGS the checkpoint was trained with, in guided-diffusion's syntax "
    "(DIFFUSION_FLAGS may follow), e.g. \"--image_size 256 --num_channels 256 --learn_sigma True ...\".",
)
def convert_adm(checkpoint: str, out_dir: str, flags: str) -> None:
    """Convert an OpenAI guided-diffusion (ADM) checkpoint into a UNet2DModel directory.

    OUT_DIR (new or empty) gets config.json, the weights as safetensors and scheduler_config.json;
    pass it as --model to the other commands.
    """
    from stages.models.adm import convert_adm_checkpoint

    written = convert_adm_checkpoint(checkpoint, out_dir, flags)
    click.echo(f"wrote {written}; `pipeline blocks --model {written}` prints its block table")

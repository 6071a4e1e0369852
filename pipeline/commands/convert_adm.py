"""`pipeline convert-adm`: an OpenAI guided-diffusion checkpoint as a UNet2DModel directory."""

from __future__ import annotations

import click

from stages.models.adm_presets import PRESETS  # a table of flag strings: no torch


@click.command("convert-adm")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--flags",
    default=None,
    help="The MODEL_FLAGS the checkpoint was trained with, in guided-diffusion's syntax "
    '(DIFFUSION_FLAGS may follow), e.g. "--image_size 256 --num_channels 256 --learn_sigma True ..." '
    "[default: the preset the checkpoint's file name names].",
)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=None,
    help="A published checkpoint's flags, by its name (256x256_diffusion_uncond is the paper's).",
)
def convert_adm(checkpoint: str, out_dir: str, flags: str | None, preset: str | None) -> None:
    """Convert an OpenAI guided-diffusion (ADM) checkpoint into a UNet2DModel directory.

    OUT_DIR (new or empty) gets config.json, the weights as safetensors and scheduler_config.json;
    pass it as --model to the other commands. A published checkpoint needs no flags:
    `pipeline convert-adm 256x256_diffusion_uncond.pt models/adm256`.
    """
    from stages.models.adm import convert_adm_checkpoint
    from stages.models.adm_presets import preset_flags, preset_for_file

    if flags is not None and preset is not None:
        raise click.UsageError("give --flags or --preset, not both")
    if flags is None:
        preset = preset or preset_for_file(checkpoint)
        if preset is None:
            raise click.UsageError(
                f"{click.format_filename(checkpoint)} is not named as a published checkpoint: "
                "give its MODEL_FLAGS with --flags, or --preset NAME (see --help)"
            )
        flags = preset_flags(preset)
    written = convert_adm_checkpoint(checkpoint, out_dir, flags)
    using = f" with the {preset.removesuffix('.pt')} preset's flags" if preset else ""
    click.echo(f"wrote {written}{using}; `pipeline blocks --model {written}` prints its block table")

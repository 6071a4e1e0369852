"""`pipeline similarity`: the alignment metrics of the field (mutual kNN, CKNNA, SVCCA, ...) beside CKA, calibrated."""

from __future__ import annotations

import click

from pipeline import options

_METRIC_HELP = (
    "all, or a comma list of: linear, debiased, minibatch, rbf (as `pipeline cka`), cka, unbiased_cka, "
    "cknna, mutual_knn, cycle_knn, lcs_knn, edit_distance_knn (platonic-rep's definitions), svcca, "
    "procrustes (a distance: 0 = equal). docs/similarity.md defines each."
)


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
@click.option("--metric", "metrics", type=options.NAMES, default="mutual_knn,cknna,unbiased_cka", help=_METRIC_HELP)
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
    help="e.g. 10,90,150 or NAME=10,90; repeatable [default: every stored timestep].",
)
@click.option("--pool", "pools", type=options.POOLS, default="1", help="Pooled grid sizes; pairs are within a pool.")
@click.option(
    "--store-pool",
    "store_pools",
    type=options.STORE_POOL,
    multiple=True,
    help="NAME=POOL: read that store at its own pool, against every --pool of the others (e.g. pixels=16: "
    "the whole 16x16 image); repeatable.",
)
@click.option("--split", default="val", help="The split whose samples are compared.")
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="A seeded random subset of this many samples [default: all of the split].",
)
@click.option(
    "--preprocess",
    default="clamp-l2",
    help="clamp-l2 (platonic-rep: clip at the 0.95 quantile of |x|, then L2-normalise rows), l2, or none.",
)
@click.option("--topk", type=int, default=10, help="Neighbours per sample of the kNN metrics and CKNNA.")
@click.option("--cca-dim", type=int, default=10, help="svcca: singular directions kept per side.")
@click.option("--batch-size", type=int, default=256, help="minibatch: samples per minibatch.")
@click.option("--rbf-sigma", type=float, default=1.0, help="rbf: bandwidth as a multiple of the median distance.")
@click.option(
    "--permutations",
    type=int,
    default=None,
    help="Calibrate: recompute each score this many times with one side's samples shuffled (seeded); "
    "reports p-value, null mean and 95th percentile, and draws calibrated heatmaps.",
)
@click.option("--bootstrap", type=int, default=None, help="A 95% interval from this many resamples of the samples.")
@click.option(
    "--best-pair",
    is_flag=True,
    help="Also report, per pair of stores, the (block, timestep) pair with the best score (best_pairs.csv).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    help="Seed of --samples, the minibatch order, the permutations and the resamples.",
)
@click.option(
    "--memory-budget",
    type=options.BYTES,
    default=None,
    help="e.g. 8GB [default: half the available memory]. Features beyond it: the kNN metrics and CKNNA "
    "read them from the store in passes; the other metrics are refused.",
)
@click.option("--threads", type=click.IntRange(min=1), default=4, help="Chunk reads in parallel.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for similarity.csv, similarity.json, best_pairs.csv and heatmaps/ (new, empty, or an "
    "earlier `pipeline similarity` output).",
)
@options.storage_option
def similarity(
    stores,
    metrics,
    blocks,
    timesteps,
    pools,
    store_pools,
    split,
    samples,
    preprocess,
    topk,
    cca_dim,
    batch_size,
    rbf_sigma,
    permutations,
    bootstrap,
    best_pair,
    seed,
    memory_budget,
    threads,
    out,
    storage_options,
) -> None:
    """Every requested similarity metric of every pair of (store, block, timestep), within and across stores."""
    from stages.similarity.run import SimilaritySettings, describe, run_similarity

    settings = SimilaritySettings(
        stores=tuple(stores),
        out=out,
        metrics=tuple(metrics),
        blocks=tuple(blocks),
        timesteps=tuple(timesteps),
        pools=pools,
        store_pools=tuple(store_pools),
        split=split,
        samples=samples,
        preprocess=preprocess,
        topk=topk,
        cca_dim=cca_dim,
        batch_size=batch_size,
        rbf_sigma=rbf_sigma,
        permutations=permutations,
        bootstrap=bootstrap,
        best_pair=best_pair,
        seed=seed,
        memory_budget=memory_budget,
        threads=threads,
        storage_options=storage_options or None,
    )
    click.echo(describe(run_similarity(settings)))

"""`pipeline probe`: train probe heads on a store's features."""

from __future__ import annotations

import functools

import click

from pipeline import options


@functools.cache
def _defaults() -> dict[str, str]:
    """The probe's defaults as its help shows them, read from `ProbeSettings` and the head registry."""
    from dataclasses import MISSING, fields

    from stages.probe.protocols import PROTOCOLS
    from stages.probe.recipes import RECIPES
    from stages.probe.registry import HEADS, default_grid
    from stages.probe.settings import DEFAULTS_OF_NONE, EPISODES_WITH_SHOTS, ProbeSettings

    values = {f.name: f.default for f in fields(ProbeSettings) if f.default is not MISSING}
    shown = {name: options.shown(value) for name, value in {**values, **DEFAULTS_OF_NONE}.items()}
    shown.update(
        {
            name: options.shown(default_grid(head))
            for name, head in (("Cs", "logreg"), ("ks", "knn"), ("alphas", "ridge"))
        }
    )
    shown["protocols"] = ", ".join(PROTOCOLS)
    by_rule: dict[tuple[int, int], list[str]] = {}
    for spec in HEADS.values():
        if spec.epochs is not None:
            by_rule.setdefault((spec.epochs, spec.min_steps), []).append(spec.name)
    shown["epochs"] = "; ".join(
        f"{epochs} for {', '.join(names)}, at least {steps} steps" for (epochs, steps), names in by_rule.items()
    )
    shown["episodes"] = f"{EPISODES_WITH_SHOTS} with --shots"
    recipe = RECIPES["diffssl"]
    shown["recipe"] = (
        f"{recipe['linear']['epochs']} epochs, batch {recipe['linear']['batch_size']}, lr "
        f"{options.shown(recipe['linear']['lrs'])} ({options.shown(recipe['attention']['lrs'])} "
        "attention)"
    )
    return shown


# An option whose help reads its default from the settings (`{name}` in the help).
_setting = functools.partial(click.option, cls=options.SettingsHelpOption, defaults=_defaults)


@click.command()
@click.option("--store", required=True, help="The feature store, a directory or an object-store URL (only read).")
@options.storage_option
@click.option(
    "--head",
    required=True,
    type=options.HEAD,
    help="torch heads train in banks (linear, mlp; cnn, attention on pooled grids); scikit-learn probes "
    "fit their whole grid (logreg, knn, ridge). Each is a row of stages/probe/registry.py.",
)
@click.option("--blocks", "blocks", type=options.BLOCKS, default="all", help="e.g. 24, 18-30, 6,12,18-20 or all.")
@click.option("--timesteps", type=options.TIMESTEPS, default=None, help="Comma list [default: every stored timestep].")
@click.option(
    "--pool", "pools", type=options.POOLS, default=None, help="Pooled grid sizes [default: the store's pools]."
)
@click.option("--fuse", is_flag=True, help="One head over all requested blocks x timesteps (per pool).")
@_setting("--train-split", default=None, help="The split the heads train on [default: {train_split}].")
@click.option(
    "--val-split",
    default=None,
    help="An official validation split to choose hyper-parameters on [default: none; a stratified "
    "--val-fraction of the train split is carved out].",
)
@click.option(
    "--test-split",
    default=None,
    help="The split the chosen configuration is scored on [default: test if the store has it, else val].",
)
@click.option(
    "--out", default="results", type=click.Path(file_okay=False), help="Results root; the run goes to OUT/NAME."
)
@click.option("--name", default=None, help="Run directory name [default: the head, or <head>_fused].")
@_setting("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the fit rows [default: {epochs}].")
@_setting("--batch-size", type=click.IntRange(min=1), default=None, help="[default: {batch_size}]")
@click.option("--lr", "lrs", type=options.FLOATS, default=None, help="Learning-rate grid [default: per head].")
@click.option(
    "--weight-decay", "weight_decays", type=options.FLOATS, default=None, help="Weight-decay grid [default: per head]."
)
@_setting(
    "--optimizer", type=click.Choice(["adamw", "sgd"]), default=None, help="[default: {optimizer}, cosine schedule]"
)
@_setting(
    "--halving/--no-halving",
    default=None,
    help="Successive halving over the learning-rate grid: after 1/4 and 1/2 of the epochs only the better "
    "half of each input set's heads train on [default: {halving}].",
)
@_setting(
    "--batchnorm/--no-batchnorm",
    default=None,
    help="linear/mlp: BatchNorm without affine first [default: {batchnorm}].",
)
@_setting("--hidden", type=options.SIZES, default=None, help="mlp hidden sizes [default: {hidden}].")
@_setting("--width", type=click.IntRange(min=1), default=None, help="cnn channels [default: {width}].")
@_setting("--dim", type=click.IntRange(min=1), default=None, help="attention token width d [default: {dim}].")
@_setting(
    "--depth", type=click.IntRange(min=1), default=None, help="attention transformer blocks k [default: {depth}]."
)
@_setting("--attention-heads", type=click.IntRange(min=1), default=None, help="[default: {attention_heads}]")
@_setting(
    "--C",
    "Cs",
    type=options.FLOATS,
    default=None,
    help="logreg C grid, and the L-BFGS linear head's as weight decay 1 / (C n) [default: {Cs}].",
)
@_setting("--knn-k", "ks", type=options.INTS, default=None, help="knn k grid [default: {ks}].")
@_setting(
    "--vote",
    type=click.Choice(["softmax", "distance", "uniform"]),
    default=None,
    help="knn: each of the k neighbours votes exp(cosine similarity / T) for its class (DINOv2's kNN), "
    "1 / cosine distance (scikit-learn's weights='distance'), or 1 [default: {vote}].",
)
@_setting("--temperature", type=float, default=None, help="knn: T of the softmax vote [default: {temperature}].")
@click.option(
    "--seeds",
    type=options.SEEDS,
    default=None,
    help="Train the configuration chosen on validation again with each of these seeds (initialisation, "
    "data order, carved validation rows), e.g. 0,1,2; metrics.json reports each and their mean and "
    "std.",
)
@click.option(
    "--shots",
    type=options.SHOTS,
    default=None,
    help="Few-shot: also train on SHOTS rows of each class, e.g. 1,2,5,10,20 (--episodes seeded subsets of "
    "the fit rows per count; each the whole sweep, chosen on validation); mean and std over episodes.",
)
@_setting("--episodes", type=int, default=None, help="Few-shot subsets per --shots count [default: {episodes}].")
@_setting("--alpha", "alphas", type=options.FLOATS, default=None, help="ridge alpha grid [default: {alphas}].")
@_setting(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Share of train carved out for choosing hyper-parameters [default: {val_fraction}].",
)
@_setting("--seed", type=click.IntRange(min=0), default=None, help="[default: {seed}]")
@_setting("--device", default=None, help="auto, cpu, cuda or cuda:N [default: {device}].")
@click.option(
    "--memory-budget",
    type=options.BYTES,
    default=None,
    help="The whole process's, e.g. 8GB [default: half the available memory].",
)
@_setting(
    "--data-mode",
    type=click.Choice(["auto", "memory", "stream"]),
    default=None,
    help="Keep features in memory or stream them each epoch [default: {data_mode}, by the budget].",
)
@_setting(
    "--shuffle-window",
    type=click.IntRange(min=1),
    default=None,
    help="Samples shuffled together [default: {shuffle_window}].",
)
@click.option(
    "--allow-incomplete", is_flag=True, default=None, help="Probe only the finished samples of an unfinished store."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: the libraries' own].")
@_setting(
    "--recipe",
    type=click.Choice(["diffssl"]),
    default=None,
    help="Train as the paper's code does (linear, mlp, attention; with --fuse its DifFormer fusion): raw "
    "features, SGD without momentum, StepLR(7, 0.1), {recipe}, no grid; options given explicitly still "
    "override it.",
)
@_setting(
    "--protocol",
    default=None,
    help="A published evaluation protocol by name, one of {protocols} (stages/probe/protocols.py, "
    "docs/probes.md): dinov2 = DINOv2's linear lr grid, kNN vote and logreg C path; diffssl = --recipe "
    "diffssl; default = this project's. Options given explicitly still override it.",
)
@click.option(
    "--solver",
    type=click.Choice(["lbfgs", "minibatch"]),
    default=None,
    help="linear: lbfgs solves each head's L2-regularised objective on the in-memory fit rows over logreg's "
    "C grid, every input set and C at once, to convergence (docs/probes.md); minibatch trains with "
    "--optimizer over the --lr grid (and streams; implied by --epochs, --lr, --optimizer, "
    "--batch-size, --batchnorm, --recipe, --data-mode stream) [default: lbfgs].",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=None,
    help="Augmented views of the train split to train on, one per sample per epoch [default: all the store "
    "holds; 1: the centre view only].",
)
@click.option(
    "--render/--no-render",
    default=True,
    help="Also draw the run's heatmaps and summary.md (the report stage draws them from the results too).",
)
@options.engine_options
def probe(store, storage_options, head, render, group_size, **flags) -> None:
    """Train probe heads on every requested (block, timestep, pool) of the store in one sweep.

    With --workers, --scheduler or --cluster its input sets run as tasks on dask (see `pipeline sweep`)."""
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    engine = {key: flags.pop(key) for key in options.ENGINE_FLAGS}
    given = {key: value for key, value in flags.items() if value is not None}
    given["storage_options"] = storage_options or None
    if any(engine[key] is not None for key in ("workers", "scheduler", "cluster")):
        from stages.sweep.engine import EngineOptions
        from stages.sweep.plan import StoreRef
        from stages.sweep.run import run_sweep

        out = given.pop("out")
        done = run_sweep(
            [StoreRef(head, store)],
            [head],
            given,
            out=out,
            group_size=group_size,
            nested=False,
            engine=EngineOptions(**engine),
        )
        (result,) = done.runs.values()
        click.echo(f"{done.submitted} task(s) run, {done.reused} reused")
    else:
        result = run_probe(ProbeSettings(store=store, head=head, **given))
    if render:
        from stages.report import render_run

        render_run(result.run_dir)
    best = result.metrics["best"]
    click.echo(
        f"{len(result.rows)} configurations -> {result.run_dir}; chosen on validation: {best['key']} "
        f"(val top-1 {100 * best['val_top1']:.1f}%, test top-1 {100 * best['test_top1']:.1f}%)"
    )
    from stages.probe.results import describe_metrics

    for line in describe_metrics(result.metrics):
        click.echo(line)

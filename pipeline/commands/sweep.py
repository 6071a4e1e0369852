"""`pipeline sweep`: (store, head) probes as tasks on dask.distributed."""

from __future__ import annotations

import click

from pipeline import options
from pipeline.commands.probe import probe


@click.command()
@click.option(
    "--store",
    "stores",
    type=options.NAMED_STORE,
    multiple=True,
    required=True,
    help="A feature store: PATH, URL or NAME=PATH (NAME: its results sub-directory [default: the file name "
    "without .zarr]); repeat for more.",
)
@click.option(
    "--head", "heads", type=options.HEADS, required=True, help="Comma list of head kinds, e.g. linear,mlp,logreg."
)
@click.option(
    "--out",
    default="results",
    type=click.Path(file_okay=False),
    help="Results root: runs go to OUT/<store>/<head>, task results to OUT/.sweep/.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the tasks, which are done, and with --cluster the job script; run nothing."
)
def sweep(stores, heads, out, dry_run, group_size, **flags) -> None:
    """Train every (store, head) over every requested input set, as tasks on dask.distributed.

    A task is one store, one head and a group of input sets with its whole hyper-parameter grid; its
    results are written under OUT/.sweep/tasks/ keyed by everything that determines them, so a rerun
    (after a killed driver, worker or cluster) runs only the missing tasks. Results equal the serial
    run's for any number of workers. Options after --dry-run are those of `pipeline probe` (but each task
    runs one thread unless --threads says otherwise); tables and plots come from `pipeline report
    --results OUT/<store>`.
    """
    from stages.probe.results import describe_metrics
    from stages.sweep.engine import EngineOptions
    from stages.sweep.plan import StoreRef, plan_sweep
    from stages.sweep.run import run_sweep

    engine = EngineOptions(**{key: flags.pop(key) for key in options.ENGINE_FLAGS})
    storage_options = flags.pop("storage_options")
    given = {key: value for key, value in flags.items() if value is not None}
    given["storage_options"] = storage_options or None
    refs = [StoreRef(name, location) for name, location in stores]
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
    for result in done.runs.values():
        best = result.metrics["best"]
        click.echo(
            f"{result.run_dir}: {len(result.rows)} configurations; chosen on validation: {best['key']} "
            f"(val top-1 {100 * best['val_top1']:.1f}%, test top-1 {100 * best['test_top1']:.1f}%)"
        )
        for line in describe_metrics(result.metrics):
            click.echo(line)
    click.echo(f"{len(done.plan.tasks)} task(s): {done.submitted} run, {done.reused} reused")


# The probe's options, one definition for both commands (the sweep's own --store, --head and --out first).
sweep.params.extend(p for p in probe.params if p.name not in ("store", "head", "out", "name", "render"))

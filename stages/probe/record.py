"""Finishing a run, the same for every engine: the record, the repeats it asks for, the result files.

`pipeline probe` (stages.probe.run) and `pipeline sweep` / `probe --workers` (stages.sweep.run)
both end here with their configs rows and test predictions, so run.json, metrics.json and
configs.csv come from one place (`stages.probe.results`) whatever trained the heads.
"""

from __future__ import annotations

from pathlib import Path

from stages.probe.repeats import few_shot_episodes, seed_repeats
from stages.probe.results import best_row, run_record, write_run


def finish_run(
    directory: Path, plan, rows: list[dict], predictions: dict, *, location: str, engine: dict, device
) -> tuple[dict, dict]:
    """Write the run into `directory` (its staging copy); (run.json, metrics.json) as written.

    `engine`: run.json's ENGINE_FIELDS. With `--seeds` or `--shots` the repeats (`stages.probe.repeats`)
    train here, on `device`, before anything is written."""
    settings = plan.settings
    record = run_record(plan, location=location, engine=engine)
    extras, subsets = {}, None
    if settings.seeds:
        best = best_row([{**r, "val_top1": float(r["val_top1"])} for r in rows])
        extras["seeds"] = seed_repeats(plan.store, settings, best, device)
    if settings.shots:
        extras["few_shot"], subsets = few_shot_episodes(plan.store, settings, device)
    metrics = write_run(directory, rows, predictions, record, plan.samples, extras=extras, few_shot_subsets=subsets)
    return record, metrics

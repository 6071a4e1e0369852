"""The probe stage: train heads on stored features for every requested (block, timestep, pool) at once.

    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings
    result = run_probe(ProbeSettings(store="features/pretrained.zarr", head="linear", pools=(1, 2)))
    result.metrics["best"]          # chosen on validation, with its test accuracy

What one run does, in order:

1. Resolve the request against the store (`stages.probe.plan.make_plan`): the input sets, the rows of
   each split role, whether features are kept in memory or streamed, in how many passes.
2. Train, pass by pass: torch heads of every input set x hyper-parameter set together
   (`stages.probe.torch_sweep`), or scikit-learn estimators one input set after the other over their
   whole grid (`stages.probe.sklearn_sweep`). The hyper-parameters are chosen on the validation
   rows; the test split is scored once, for the chosen configuration of each input set only.
3. With `seeds` or `shots`, train the repeats (`stages.probe.repeats`); write the results
   (`stages.probe.record`, the same for every engine) into `<out>/<name>/`, built beside it and renamed
   into place only when complete. Tables and plots are `stages.report`'s job.

Every mode and every split into passes trains the same heads: the memory budget only decides what
is cached.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.reader import FeatureStore
from stages.devices import resolve_device
from stages.outputs import full_disk_is_one_line, output_lock
from stages.probe.plan import ProbeInputError, make_plan
from stages.probe.record import finish_run
from stages.probe.settings import ProbeSettings
from stages.probe.sklearn_sweep import sweep_sklearn
from stages.probe.torch_sweep import sweep_torch

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    run_dir: Path
    rows: list[dict]  # every configuration (configs.csv)
    metrics: dict  # metrics.json
    record: dict = field(repr=False)  # run.json


def run_probe(settings: ProbeSettings) -> ProbeResult:
    """Run the sweep and write `<out>/<name>/` (see the module docstring); the store is only read."""
    with thread_limit(settings.threads):
        return _run_probe(settings)


@contextlib.contextmanager
def thread_limit(threads: int | None):
    # Small matmuls on a busy machine are far faster single-threaded (spinning BLAS/OpenMP
    # workers); a user can set the count, and the libraries' defaults are kept otherwise.
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def _run_probe(settings: ProbeSettings) -> ProbeResult:
    # Held for the whole run: no writer may replace the store under it (a replaced one stops the reads).
    with FeatureStore.open(settings.store, settings.storage_options).hold() as store:
        return _probe(store, settings)


def _probe(store: FeatureStore, settings: ProbeSettings) -> ProbeResult:
    started = time.perf_counter()
    plan = make_plan(store, settings)
    device = resolve_device(settings.device)
    samples = plan.samples
    log.info(
        "%s: %d input sets x %d hyper-parameter sets, %d fit / %d validation (%s) / %d test (%s) samples, "
        "%s mode, %d pass(es)",
        plan.spec.name,
        len(plan.combos),
        len(plan.hypers),
        len(samples.fit),
        len(samples.selection),
        samples.roles(settings)["validation"],
        len(samples.test),
        samples.test.split,
        plan.mode,
        len(plan.passes),
    )
    final = Path(settings.out) / settings.run_name
    partial = Path(settings.out) / f".{settings.run_name}.partial"
    with output_lock(final, "probe"):  # one staging directory per run directory: one writer at a time
        _prepare(final, partial)
        try:
            with full_disk_is_one_line(Path(settings.out), "saving the probe's heads and results"):
                rows, metrics, record = _train_and_write(plan, store, settings, device, partial, started)
                if final.exists():
                    shutil.rmtree(final)
                partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # a half-written result is never left behind
            raise
    log.info("wrote %s in %.1f s", final, time.perf_counter() - started)
    return ProbeResult(final, rows, metrics, record)


def _train_and_write(plan, store: FeatureStore, settings: ProbeSettings, device, partial: Path, started: float):
    """Train every pass, saving the chosen heads into `partial`, and write the result files there."""
    sweep = sweep_torch if plan.spec.is_torch else sweep_sklearn
    rows, predictions = [], {}
    for number, members in enumerate(plan.passes):
        combos = [plan.combos[i] for i in members]
        log.info("pass %d/%d: %s", number + 1, len(plan.passes), ", ".join(c.key for c in combos))
        pass_rows, pass_predictions = sweep(plan, combos, partial / "heads", device)
        rows += pass_rows
        predictions.update(pass_predictions)
    engine = {"device": str(device), "seconds": round(time.perf_counter() - started, 3), "versions": _versions()}
    record, metrics = finish_run(
        partial, plan, rows, predictions, location=str(settings.store), engine=engine, device=device
    )
    return rows, metrics, record


def _prepare(final: Path, partial: Path) -> None:
    if final.exists() and any(final.iterdir()) and not (final / "run.json").exists():
        raise ProbeInputError(f"{final} exists and is not a probe result directory; choose another --out or --name")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "heads").mkdir(parents=True)


def _versions() -> dict:
    import sklearn

    return {"torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__}

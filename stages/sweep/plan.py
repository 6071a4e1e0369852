"""A sweep resolved before anything runs: every (store, head) as a probe plan, cut into tasks.

    plan = plan_sweep([StoreRef("adm256", "features/adm256.zarr")], ["linear", "logreg"],
                      {"blocks": (18, 19), "pools": (1, 2)})
    [task.key for task in plan.tasks]

A task is one (store, head, group of input sets) with its whole hyper-parameter grid, so batched
linear banks and successive halving keep their economy inside it. Groups are cut, in the probe
plan's order, from its passes (which the driver's memory budget decides, as `pipeline probe` would),
`group_size` input sets at most (0: whole passes). Members are seeded from their identity, never from
grouping, so a task trains what the serial run trains. By default (`group_size=None`) linear and MLP
heads keep whole passes: their bank computes all input sets of a size as one tensor, and a bank of
another size rounds a few weights differently in the last bit (vectorised loops handle the tensor's
tail elements apart). CNN, attention and scikit-learn heads train each input set on its own, so they
are cut into tasks of one input set, bit-identical to the serial run. Any engine, any number of
workers and any order of completion give bit-identical results for the same plan.

A task's key is a sha256 of everything that determines its results: the store's fingerprint, the
head, its input sets, every setting that reaches the numbers (seed, grids, epochs, optimizer, split
roles, the data mode the driver resolved, threads, device), the rows of every split role, and the
code and library versions (`stages.sweep.versions`). Paths, names, the memory budget and read
threads are not in it: they never change a number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from cache.errors import ConfigError
from cache.reader import FeatureStore
from stages.probe.plan import Combo, ProbePlan, Samples, make_plan
from stages.probe.registry import FLAT
from stages.probe.settings import ProbeSettings
from stages.sweep.versions import environment

# ProbeSettings fields that never change a trained number (or are captured by the input sets themselves)
NOT_IN_KEY = (
    "store",
    "out",
    "name",
    "blocks",
    "timesteps",
    "pools",
    "memory_budget",
    "read_threads",
    "storage_options",
    "seeds",
    "shots",
    "episodes",
)  # the last three: repeats after the tasks


@dataclass(frozen=True)
class StoreRef:
    """A store of the sweep: its name (the results sub-directory) and its location (a path or URL, passed
    as is to `FeatureStore.open` wherever a task runs)."""

    name: str
    location: str


@dataclass(frozen=True)
class Task:
    """One unit of work: the input sets `combos` (indices into its run's plan) of one store and head."""

    key: str
    run: str  # the run directory, relative to the results root
    store: StoreRef
    settings: ProbeSettings  # the data mode fixed to the one the driver resolved
    combos: tuple[int, ...]
    combo_keys: tuple[str, ...]

    def payload(self, root: str) -> dict:
        """What a worker needs (plain data, no arrays): it reopens the store by its location."""
        return {
            "key": self.key,
            "run": self.run,
            "location": self.store.location,
            "settings": asdict(self.settings),
            "combos": list(self.combos),
            "combo_keys": list(self.combo_keys),
            "root": str(root),
            "environment": environment(),
        }


@dataclass(frozen=True)
class RunPlan:
    """One (store, head) of the sweep: its probe plan, as `pipeline probe` would make it, and its tasks."""

    run: str
    store: StoreRef
    settings: ProbeSettings
    plan: ProbePlan = field(repr=False)
    tasks: list[Task]

    @property
    def samples(self) -> Samples:
        return self.plan.samples


@dataclass(frozen=True)
class SweepPlan:
    runs: list[RunPlan]
    group_size: int | None

    @property
    def tasks(self) -> list[Task]:
        return [task for run in self.runs for task in run.tasks]

    def record(self) -> dict:
        """The grouping, as recorded before anything runs (and in every run.json)."""
        return {
            "group_size": self.group_size,
            "runs": [
                {
                    "run": r.run,
                    "store": r.store.location,
                    "head": r.settings.head,
                    "tasks": [{"key": t.key, "inputs": list(t.combo_keys)} for t in r.tasks],
                }
                for r in self.runs
            ],
        }

    @property
    def key(self) -> str:
        return hashlib.sha256(" ".join(t.key for t in self.tasks).encode()).hexdigest()[:16]


def _rows_digest(samples: Samples) -> dict:
    def digest(index: np.ndarray) -> str:
        return hashlib.sha256(np.asarray(index, np.int64).tobytes()).hexdigest()

    return {
        role: {"split": rows.split, "sha256": digest(rows.index)}
        for role, rows in (("fit", samples.fit), ("selection", samples.selection), ("test", samples.test))
    }


def task_key(plan: ProbePlan, combos: list[Combo]) -> str:
    """sha256 (32 hex digits) of everything that determines the results of `combos` under `plan`."""
    settings = {k: v for k, v in asdict(plan.settings).items() if k not in NOT_IN_KEY}
    content = {
        "store_fingerprint": plan.store.fingerprint,
        "inputs": [{"inputs": c.inputs, "pool": c.pool, "shapes": c.shapes} for c in combos],
        "settings": settings,
        "hypers": plan.hypers,
        "options": plan.options,
        "epochs": plan.epochs,
        "rungs": plan.rungs,
        "mode": plan.mode,
        "window_chunks": plan.window_chunks,
        "num_classes": plan.num_classes,
        "rows": _rows_digest(plan.samples),
        "environment": environment(),
    }
    text = json.dumps(content, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_run(
    store: FeatureStore, ref: StoreRef, settings: ProbeSettings, *, group_size: int | None, nested: bool
) -> RunPlan:
    """The probe plan of one (store, head) and its tasks (see the module docstring)."""
    plan = make_plan(store, settings)
    # Every task trains in the mode this plan chose: memory and streamed training agree only to rounding.
    pinned = replace(settings, data_mode=plan.mode)
    plan = replace(plan, settings=pinned)
    run = f"{ref.name}/{settings.run_name}" if nested else settings.run_name
    tasks = []
    for members in plan.passes:
        size = group_size if group_size is not None else (0 if plan.spec.family == FLAT else 1)
        size = size or len(members)  # 0: whole passes, grouped exactly as `pipeline probe` groups them
        for start in range(0, len(members), size):
            group = tuple(members[start : start + size])
            combos = [plan.combos[i] for i in group]
            tasks.append(Task(task_key(plan, combos), run, ref, pinned, group, tuple(c.key for c in combos)))
    return RunPlan(run, ref, settings, plan, tasks)


def plan_sweep(
    stores: list[StoreRef], heads: list[str], options: dict, *, group_size: int | None = None, nested: bool = True
) -> SweepPlan:
    """Every (store, head) with every requested input set, as tasks; `options` are ProbeSettings fields.

    `nested`: runs go to <root>/<store name>/<head> (`pipeline sweep`), else to <root>/<head> (one store,
    `pipeline probe`). The stores are opened here (metadata and labels only) and closed again."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0):
        raise ConfigError(
            f"The 'group_size' setting of the sweep must be None or a non-negative integer (0: whole "
            f"passes). Got {group_size!r} instead."
        )
    if not stores or not heads:
        raise ConfigError("a sweep needs at least one --store and one --head")
    names = [s.name for s in stores]
    if len(set(names)) != len(names):
        raise ConfigError(f"stores need distinct names, got {names}; name them with --store NAME=PATH")
    if len(set(heads)) != len(heads):
        raise ConfigError(f"--head names a head twice: {', '.join(heads)}")
    settings = [[ProbeSettings(store=s.location, head=h, **options) for h in heads] for s in stores]  # checks first
    runs = []
    for ref, per_head in zip(stores, settings):
        store = FeatureStore.open(ref.location, options.get("storage_options"))
        runs += [plan_run(store, ref, s, group_size=group_size, nested=nested) for s in per_head]
    return SweepPlan(runs, group_size)

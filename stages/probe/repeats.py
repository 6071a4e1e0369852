"""Runs repeated after the main one: the chosen configuration per seed, the sweep per few-shot episode.

    seeds = seed_repeats(store, settings, best_row, device)      # metrics.json "seeds"
    shots, subsets = few_shot_episodes(store, settings, device)  # metrics.json "few_shot"

- `--seeds 0,1,2`: the configuration chosen on validation (its input set and hyper-parameters, no grid)
  is trained again once per seed: the seed decides the initialisation, the data order and the
  validation rows carved out of the train split. Each is scored on the test split; metrics.json
  gives every seed's numbers and their mean and standard deviation.
- `--shots 1,5 --episodes N`: for each shot count, N episodes (`stages.probe.fewshot`), each the
  whole sweep (every input set and hyper-parameter set, chosen on the validation rows) trained on the
  episode's rows only; metrics.json gives every episode's chosen configuration and the mean and
  standard deviation over episodes.

They run where the results are assembled (for `pipeline sweep`, in the driver), one after the other.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from stages.probe.metrics import balanced_accuracy, mean_std, topk_accuracy
from stages.probe.plan import make_plan
from stages.probe.sklearn_sweep import sweep_sklearn
from stages.probe.torch_sweep import sweep_torch

log = logging.getLogger(__name__)


def train_once(store, settings, device) -> tuple[dict, dict, object]:
    """(the chosen row, its scores, the plan) of a sweep under `settings`, trained in a scratch directory."""
    plan = make_plan(store, settings)
    sweep = sweep_torch if plan.spec.is_torch else sweep_sklearn
    rows, predictions = [], {}
    with tempfile.TemporaryDirectory(prefix="probe-repeat-") as scratch:
        (Path(scratch) / "heads").mkdir()
        for members in plan.passes:
            combos = [plan.combos[i] for i in members]
            pass_rows, pass_predictions = sweep(plan, combos, Path(scratch) / "heads", device)
            rows += pass_rows
            predictions.update(pass_predictions)
    chosen = [r for r in rows if r["selected"] == 1]
    best = max(chosen, key=lambda r: r["val_top1"])  # results.best_row's rule: first on ties
    top, labels = np.asarray(predictions[best["key"]]), plan.samples.test.y
    scores = {
        "test_top1": topk_accuracy(top, labels, 1),
        "test_top5": topk_accuracy(top, labels, 5) if plan.num_classes > 5 and top.shape[1] >= 5 else None,
        "test_balanced": balanced_accuracy(top, labels, plan.num_classes),
        "val_top1": float(best["val_top1"]),
        "fit_rows": len(plan.samples.fit),
    }
    return best, scores, plan


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("test_top1", "test_top5", "test_balanced", "val_top1"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = mean_std(values)
    return out


def _numbers(text) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split("+"))


def seed_repeats(store, settings, best: dict, device) -> dict:
    """Train the configuration `best` (a configs.csv row) once per seed of `settings.seeds` (see the module)."""
    spec = settings.spec
    fixed = {axis.setting: (best[axis.name],) for axis in spec.grid}
    runs = []
    for seed in settings.seeds:
        log.info("seed %d of %s: %s %s", seed, ",".join(map(str, settings.seeds)), best["key"], fixed)
        repeat = replace(
            settings,
            seed=seed,
            seeds=None,
            shots=None,
            episodes=None,
            episode=None,
            blocks=_numbers(best["blocks"]),
            timesteps=_numbers(best["timesteps"]),
            pools=(int(best["pool"]),),
            halving=False,
            **fixed,
        )
        _, scores, _ = train_once(store, repeat, device)
        runs.append({"seed": seed, **scores})
    return {
        "configuration": {"key": best["key"], **{axis.name: best[axis.name] for axis in spec.grid}},
        "varies": "initialisation, data order, carved validation rows",
        "runs": runs,
        **_summary(runs),
    }


def few_shot_episodes(store, settings, device) -> tuple[dict, dict]:
    """(metrics.json's "few_shot", {"<shots>/<episode>": fit rows}) of `settings.shots` x `settings.episodes`."""
    from stages.probe.fewshot import RULE

    out, subsets = {}, {}
    for shots in settings.shots:
        runs = []
        for episode in range(settings.episodes):
            log.info("few-shot: %d shot(s), episode %d of %d", shots, episode + 1, settings.episodes)
            run = replace(settings, seeds=None, shots=None, episodes=None, episode=(shots, episode))
            best, scores, plan = train_once(store, run, device)
            subsets[f"{shots}/{episode}"] = plan.samples.fit.index.tolist()
            runs.append(
                {
                    "episode": episode,
                    "key": best["key"],
                    "indices_sha256": plan.record()["few_shot"]["indices_sha256"],
                    **scores,
                }
            )
        out[str(shots)] = {"runs": runs, **_summary(runs)}
    return {"episodes": settings.episodes, "seed": settings.seed, "rule": RULE, "shots": out}, subsets

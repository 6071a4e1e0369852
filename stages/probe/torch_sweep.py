"""The torch sweep: every input set x hyper-parameter set of a pass trained together, in the same passes.

Each member has its own optimizer param group and its own seed (from its identity); the features
are read once per epoch for all of them (once in all when kept in memory), and flat heads of equal
input size are batched matmuls (`stages.probe.banks`). Successive halving retires the worse half of
each input set's members, by validation accuracy, at the plan's rungs; the survivors train exactly
as they would alone. The chosen member of each input set is scored once on the test split, as the
saved probe that reads raw store features.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from stages.probe import heads as H
from stages.probe.banks import FlatBank, ModuleBank, fit_lbfgs, member_seed
from stages.probe.features import Layout, MemorySource, Reader, StreamSource, Views, fit_statistics, identity_statistics
from stages.probe.plan import Combo, ProbePlan, Rows
from stages.probe.recipes import STEP_EPOCHS, STEP_GAMMA
from stages.probe.registry import FLAT
from stages.probe.results import make_row, probe_config
from stages.probe.scoring import Tally, accuracy, best_members, select, topk

log = logging.getLogger(__name__)


def sweep_torch(plan: ProbePlan, combos: list[Combo], heads_dir: Path, device: torch.device) -> tuple[list[dict], dict]:
    """Train, choose and score the heads of `combos` (one pass); (configs rows, test predictions per key)."""
    settings, samples, hypers = plan.settings, plan.samples, plan.hypers
    flat = plan.spec.family == FLAT
    per_channel = plan.spec.standardisation == "per channel"
    recipe = settings.recipe is not None  # the paper's: raw features, SGD, StepLR per epoch (stages.probe.recipes)
    raw = not settings.standardise  # the recipe's and protocols' raw features
    reader = Reader(
        plan.store,
        [p for c in combos for p in c.pieces],
        allow_incomplete=settings.allow_incomplete,
        threads=settings.read_threads,
    )
    layout = Layout(combos, flat)
    fit_split, fit_mask = samples.fit.split, samples.fit_mask()
    views = Views(plan.views, settings.seed)
    if plan.mode == "memory":
        train = MemorySource(reader, layout, fit_split, fit_mask, per_channel, device, raw=raw, views=views)
    else:
        stats = identity_statistics(reader) if raw else fit_statistics(reader, fit_split, fit_mask, per_channel, device)
        train = StreamSource(reader, layout, fit_split, stats, views=views)
    selection = train if samples.carved else StreamSource(reader, layout, samples.selection.split, train.stats)
    seeds = [
        [member_seed(settings.seed, plan.spec.name, c.key, json.dumps(h, sort_keys=True)) for h in hypers]
        for c in combos
    ]
    if flat:
        bank = FlatBank(
            [c.dim for c in combos],
            len(hypers),
            plan.num_classes,
            seeds=seeds,
            batchnorm=bool(plan.options.get("batchnorm", False)),
            hidden=tuple(plan.options.get("hidden", ())),
            default_init=recipe,
        )
    else:
        bank = ModuleBank(
            plan.spec.name, [c.shapes for c in combos], len(hypers), plan.num_classes, plan.options, seeds
        )
    bank.to(device)
    labels = torch.from_numpy(samples.fit.labels)
    if settings.solver == "lbfgs":  # in memory: every member solved to its optimum on the full fit rows
        validation = None
        if samples.carved:  # the validation rows are train rows in memory: the path may stop past each set's peak
            validation = (
                layout.take(train.packed, samples.selection.index, device),
                torch.from_numpy(samples.selection.labels[samples.selection.index]).to(device),
            )
        # every stored view of a fit row is a row of the objective (MemorySource: view v at rows v * n); the decay
        # is divided by the views so that C keeps scikit-learn's meaning on all of those rows
        views_count = train.views.count
        rows = np.concatenate([samples.fit.index + v * train.n for v in range(views_count)])
        trained, counts = fit_lbfgs(
            bank,
            layout.take(train.packed, rows, device),
            labels[samples.fit.index].repeat(views_count).to(device),
            [h["weight_decay"] / views_count for h in hypers],
            validation=validation,
            max_iter=settings.lbfgs_iterations,
        )
        log.info("L-BFGS: %d of %d heads trained along the C path: %s", len(trained), bank.num_members, counts)
        measured = _validate(
            bank, selection, layout, samples.selection, samples.chunk_samples, device, plan.num_classes
        )
        # a C the path stopped before was not trained: no validation score, epochs 0, never chosen
        scores = {m: (1, *v) if m in trained else (0, float("nan"), None, float("nan")) for m, v in measured.items()}
        finished = trained
        lr_per_epoch = {l: [float(h["lr"])] for l, h in enumerate(hypers)}
    else:
        epochs = plan.epochs
        schedules = [plan.schedule(e) for e in range(epochs)]
        total = sum(len(w.batches) for s in schedules for w in s)
        groups = bank.param_groups(hypers)
        if recipe:  # finetune.py: SGD(params, lr) without momentum, StepLR(optimizer, 7, 0.1) stepped per epoch
            optimizer = torch.optim.SGD(groups, momentum=0.0)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, STEP_EPOCHS, STEP_GAMMA)
        else:
            if settings.optimizer == "adamw":
                optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)
            else:
                optimizer = torch.optim.SGD(groups, momentum=0.9, fused=True)
            warm = int(settings.warmup * total)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: (
                    (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
                ),
            )
        rungs = dict(plan.rungs)
        scores = {}  # member -> (epochs trained, val top-1, val top-5, val loss), from where it stopped
        lr_per_epoch = {l: [] for l in range(len(hypers))}  # as the optimizer had it, recorded with each saved head
        for epoch, schedule in enumerate(schedules, 1):
            bank.train()
            for group in optimizer.param_groups:
                if group["params"] and len(lr_per_epoch[group["hyper"]]) < epoch:
                    lr_per_epoch[group["hyper"]].append(float(group["lr"]))
            loss_sum, steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
            for window in schedule:
                packed, local = train.window(window.chunks, epoch - 1)
                for rows in window.batches:
                    batch = layout.take(packed, local(rows), device)
                    y = labels[rows].to(device)
                    loss = bank.loss(batch, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if not recipe:
                        scheduler.step()
                    loss_sum += loss.detach()
                    steps += 1
            if recipe:
                scheduler.step()
            log.info(
                "epoch %d/%d: mean loss per head %.4f (%d heads)",
                epoch,
                epochs,
                float(loss_sum) / len(bank.active) / max(steps, 1),
                len(bank.active),
            )
            if epoch in rungs or epoch == epochs:
                measured = _validate(
                    bank, selection, layout, samples.selection, samples.chunk_samples, device, plan.num_classes
                )
                scores.update({m: (epoch, *v) for m, v in measured.items()})
            if epoch in rungs:
                keep = [
                    m
                    for ci in range(len(combos))
                    for m in best_members(scores, [m for m in bank.active if m // len(hypers) == ci], rungs[epoch])
                ]
                log.info(
                    "successive halving after epoch %d: %d of %d heads per input set train on",
                    epoch,
                    rungs[epoch],
                    len(bank.active) // len(combos),
                )
                bank.keep(keep)
        finished = set(bank.active)
    rows_out, chosen = [], {}
    for ci, combo in enumerate(combos):
        combo_rows = []
        for l, hyper in enumerate(hypers):
            trained, top1, top5, loss = scores[ci * len(hypers) + l]
            combo_rows.append(make_row(plan.spec.name, combo, hyper, top1, top5))
            combo_rows[-1].update(val_loss=float(loss), epochs=trained)
        # only members that trained every epoch compete; retired ones keep their scores from the rung
        best = select(combo_rows, [l for l in range(len(hypers)) if ci * len(hypers) + l in finished])
        combo_rows[best]["selected"] = 1
        chosen[ci] = (ci * len(hypers) + best, combo_rows[best])
        rows_out += combo_rows
    # test: only the chosen member of each input set, as the saved probe that reads raw features
    probes = {}
    for ci, (member, _row) in chosen.items():
        combo = combos[ci]
        means = [torch.from_numpy(train.stats[p][0]) for p in combo.pieces]
        stds = [torch.from_numpy(train.stats[p][1]) for p in combo.pieces]
        probes[ci] = H.Probe(bank.export(member), means, stds).to(device).eval()
    predictions = _score_test(reader, combos, probes, samples.test, samples.chunk_samples, device)
    for ci, (member, row) in chosen.items():
        top1, top5 = accuracy(predictions[combos[ci].key], samples.test.y)
        row["test_top1"], row["test_top5"] = top1, "" if top5 is None else top5
        config = probe_config(plan, combos[ci], row)
        config["lr_per_epoch"] = lr_per_epoch[member % len(hypers)][: row["epochs"]]
        H.save_probe(probes[ci].cpu(), heads_dir / combos[ci].key, config)
    return rows_out, predictions


def _validate(bank, source, layout: Layout, rows: Rows, chunk_samples: int, device, num_classes: int) -> dict:
    """{member: (val top-1, val top-5 or None, val loss)} of the bank's active members on the selection
    rows, chunk by chunk (the same batches in memory and stream mode)."""
    bank.eval()
    active = list(bank.active)
    tally = Tally(len(active), num_classes)
    with torch.no_grad():
        for k, index in rows.by_chunk(chunk_samples):
            packed, local = source.window([k])
            tally.add(bank(layout.take(packed, local(index), device)), torch.from_numpy(rows.labels[index]))
    top1, top5, losses = tally.result()
    return {m: (top1[i], None if top5 is None else top5[i], losses[i]) for i, m in enumerate(active)}


def _score_test(reader: Reader, combos: list[Combo], probes: dict, rows: Rows, chunk_samples: int, device) -> dict:
    """{key: (n_test, k) top-k class indices} from raw test features, chunk by chunk."""
    out = {c.key: [] for c in combos}
    chunks = rows.by_chunk(chunk_samples)
    with torch.no_grad():
        for (k, index), (_, pieces) in zip(chunks, reader.chunks(rows.split, [k for k, _ in chunks])):
            local = index - k * chunk_samples
            for ci, combo in enumerate(combos):
                inputs = [torch.from_numpy(pieces[p][local]).to(device) for p in combo.pieces]
                out[combo.key].append(topk(probes[ci](*inputs), 5))
    return {key: np.concatenate(parts) for key, parts in out.items()}

"""Few-shot subsets of the train split: `shots` rows of every class, drawn per episode.

    rows = few_shot_rows(labels, fit_rows, shots=5, episode=2, seed=0)

Episode e of a run draws one permutation of each class's fit rows with
`np.random.default_rng([seed, 3, e])` (classes in label order); the `shots`-shot subset is the first
`shots` rows of each permutation. So the subsets are:

- class-balanced: exactly `shots` rows of every class of the fit rows;
- a pure function of (seed, shots, episode) and the fit rows, so a rerun draws them again exactly;
- nested across shot counts within an episode (its 1-shot rows are among its 5-shot rows), as in
  the 1% / 10% ImageNet lists, so a curve over shot counts is not blurred by a new draw per point;
- independent across episodes (two episodes may share rows): each is a fresh draw, and the spread
  over episodes is the sampling spread of an n-shot result.

The fit rows are the train split less the validation rows carved out of it (or all of it, with an
official validation split): hyper-parameters are still chosen on the validation rows and the chosen
configuration scored on the whole test split, as in a full run.
"""

from __future__ import annotations

import hashlib

import numpy as np

RULE = (
    "stages.probe.fewshot.few_shot_rows: first `shots` of each class's permutation by default_rng([seed, 3, episode])"
)


def few_shot_rows(labels: np.ndarray, rows: np.ndarray, *, shots: int, episode: int, seed: int) -> np.ndarray:
    """(shots x classes,) sorted rows of `rows`: the episode's `shots` rows of each class (see the module)."""
    rng = np.random.default_rng([int(seed), 3, int(episode)])
    rows = np.asarray(rows)
    chosen = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        order = rng.permutation(len(members))
        if shots > len(members):
            raise ValueError(f"class {c} has {len(members)} fit rows, fewer than {shots} shots")
        chosen.append(members[order[:shots]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def smallest_class(labels: np.ndarray, rows: np.ndarray) -> tuple[int, int]:
    """(class, its number of rows) of the class with the fewest of `rows` (the lowest class on ties)."""
    classes, counts = np.unique(labels[np.asarray(rows)], return_counts=True)
    i = int(np.argmin(counts))
    return int(classes[i]), int(counts[i])


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()

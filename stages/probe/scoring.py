"""Scoring heads: accuracy counts, top-k predictions and the one rule that chooses a configuration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class Tally:
    """Top-1 / top-5 counts and summed cross-entropy per member."""

    def __init__(self, members: int, num_classes: int):
        self.top1, self.top5, self.loss, self.n = np.zeros(members), np.zeros(members), np.zeros(members), 0
        self.k5 = num_classes > 5

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (M, B, K); rows with a non-finite logit count as wrong."""
        finite = torch.isfinite(logits).all(dim=2)
        labels = labels.to(logits.device)
        self.top1 += ((logits.argmax(dim=2) == labels) & finite).sum(dim=1).cpu().numpy()
        losses = F.cross_entropy(logits.transpose(1, 2), labels.expand(logits.shape[0], -1), reduction="none")
        self.loss += torch.where(finite, losses, torch.inf).sum(dim=1).double().cpu().numpy()
        if self.k5:
            top = logits.topk(5, dim=2).indices
            self.top5 += ((top == labels[None, :, None]).any(dim=2) & finite).sum(dim=1).cpu().numpy()
        self.n += logits.shape[1]

    def result(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        n = max(self.n, 1)
        return self.top1 / n, (self.top5 / n if self.k5 else None), self.loss / n


def topk(logits: torch.Tensor, k: int) -> np.ndarray:
    """(N, K) -> (N, min(k, K)) class indices, best first; rows with non-finite logits get -1."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices.cpu().numpy().astype(np.int32)
    top[~torch.isfinite(logits).all(dim=1).cpu().numpy()] = -1
    return top


def accuracy(top: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    """(top-1, top-5 or None when fewer than 5 classes are ranked) of (N, k) predictions."""
    top1 = float(np.mean(top[:, 0] == labels))
    top5 = float(np.mean((top[:, :5] == labels[:, None]).any(axis=1))) if top.shape[1] >= 5 else None
    return top1, top5


def select(rows: list[dict], candidates: Sequence[int] | None = None) -> int:
    """Index of the best validation top-1 among `candidates` (default: all rows); ties go to the lower
    validation loss, then to grid order.

    (On a small validation subset many settings tie at the top, and the loss tells them apart.)"""
    candidates = range(len(rows)) if candidates is None else candidates
    return min(candidates, key=lambda i: (-rows[i]["val_top1"], rows[i]["val_loss"], i))


def best_members(scores: dict, members: list[int], keep: int) -> list[int]:
    """The `keep` best of `members` ({member: (epochs, top-1, top-5, loss)}) by the rule `select` uses."""
    return sorted(members, key=lambda m: (-scores[m][1], scores[m][3], m))[:keep]

"""How the store's messages name things: runs of chunk numbers and sizes in bytes."""

from __future__ import annotations

from collections.abc import Sequence


def format_ranges(numbers: Sequence[int], limit: int = 10) -> str:
    """Sorted integers as runs, e.g. [0, 1, 2, 5] -> '0-2, 5' (at most `limit` runs, then '...')."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans[:limit]) + (", ..." if len(spans) > limit else "")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (binary units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

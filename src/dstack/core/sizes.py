"""Sizes as people read them."""

from __future__ import annotations


def human_size(n: float) -> str:
    """1536 -> '1.5 KB' (units of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

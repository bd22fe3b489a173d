"""Sizes as people read them."""

from __future__ import annotations


def human_size(n: float) -> str:
    """1536 -> '1.5 KB', 16 * 2**30 -> '16 GB' (units of 1024): every size dstack prints, bytes of files and
    memory of machines alike, and a form that workflows.yaml takes back (`memory: 16 GB`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f}".removesuffix(".0") + f" {unit}"
        n /= 1024
    return f"{n} B"


def plural(n: int, word: str) -> str:
    """`1 file`, `2 files`."""
    return f"{n} {word}{'' if n == 1 else 's'}"

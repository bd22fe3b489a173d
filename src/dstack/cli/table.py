"""Plain column tables: fast for thousands of rows, colour only on a terminal. A cell is printed escaped
(`\n`, `\x1b`): text from elsewhere (a hostname, a reason, a file's name) cannot forge a row or move the cursor."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from dstack.core.names import printable

COLORS = {"green": "32", "red": "31", "yellow": "33", "cyan": "36", "blue": "34", "bold": "1", "dim": "2"}


def paint(text: str, color: str | None, enabled: bool) -> str:
    if not enabled or not color or color not in COLORS:
        return text
    return f"\033[{COLORS[color]}m{text}\033[0m"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                color_of: Callable[[int, str], str | None] | None = None, file=None) -> None:
    """Columns separated by two spaces, as wide as their widest cell; `color_of(column, cell)`."""
    out = file or sys.stdout
    tty = out.isatty()
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(paint(h.ljust(widths[i]), "bold", tty) for i, h in enumerate(headers)).rstrip()]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            color = color_of(i, cell) if color_of else None
            cells.append(paint(cell.ljust(widths[i]), color, tty))
        lines.append("  ".join(cells).rstrip())
    out.write("\n".join(lines) + "\n")

"""Printing: errors, tables, times."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from dstack.core.errors import ConfigError, DstackError


def print_error(e: DstackError) -> None:
    where = e.location + ": " if isinstance(e, ConfigError) and e.location else ""
    color = sys.stderr.isatty()
    red, dim, off = ("\033[31m", "\033[2m", "\033[0m") if color else ("", "", "")
    sys.stderr.write(f"{where}{red}error:{off} {e.message}\n")
    if e.hint:
        sys.stderr.write(f"  {dim}hint:{off} {e.hint.strip()}\n")


def say_if_other_project(run: dict, repo_id: str) -> None:
    """A run named here that belongs to another project is said to (run names are unique on a server, so the
    server finds it anyway): the user may have typed a name from another folder's runs."""
    if run.get("repo_id") and run["repo_id"] != repo_id:
        from dstack.core.names import printable

        sys.stderr.write(f"note: {run['run_name']} is a run of another project ({printable(run['repo_id'])}), "
                         f"not of this one ({printable(repo_id)})\n")


def ago(t: datetime | None) -> str:
    """`5 mins ago`; a week on, the local date and time. `t` without a zone is UTC."""
    if t is None:
        return ""
    t = _aware(t)
    secs = (datetime.now(UTC) - t).total_seconds()
    if secs < 60:
        return "now" if secs < 5 else f"{int(secs)} secs ago"
    if secs < 3600:
        n = int(secs // 60)
        return f"{n} min{'s' if n > 1 else ''} ago"
    if secs < 86400:
        n = int(secs // 3600)
        return f"{n} hour{'s' if n > 1 else ''} ago"
    if secs < 7 * 86400:
        n = int(secs // 86400)
        return f"{n} day{'s' if n > 1 else ''} ago"
    return t.astimezone().strftime("%Y-%m-%d %H:%M")


def local_time(t: datetime) -> str:
    """A point in time as the local date, time and zone (`2026-11-25 11:42:07 CET`)."""
    return _aware(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _aware(t: datetime) -> datetime:
    """`t` with its zone; one without is UTC (as the server keeps times)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


STATUS_STYLE = {
    "DONE": "green", "FAILED": "red", "STOPPED": "yellow", "ABORTED": "yellow", "RUNNING": "cyan",
    "UPLOADING": "cyan", "PROVISIONING": "blue", "SUBMITTED": "blue",
}


def format_overrides(overrides: dict) -> str:
    def text(v) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"--{k} {text(v)}" for k, v in overrides.items())

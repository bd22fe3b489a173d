"""Time stamps and a run's status, which follows its jobs'."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update

from dstack.core.models import JobStatus, run_status
from dstack.server.db.tables import JobRow, RunRow


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


async def refresh_run_status(s, run_name: str) -> JobStatus:
    """Set the run's status from its jobs' (in the session `s`) and return it. The run's row is locked first
    (PostgreSQL: FOR UPDATE; SQLite writes one transaction at a time anyway): two jobs of one run that end at once
    each read the other's end, instead of both reading the other as running and leaving the run RUNNING."""
    await s.execute(select(RunRow.name).where(RunRow.name == run_name).with_for_update())
    statuses = (await s.scalars(select(JobRow.status).where(JobRow.run_name == run_name))).all()
    status = run_status([JobStatus(x) for x in statuses])
    await s.execute(update(RunRow).where(RunRow.name == run_name).values(status=status.value))
    return status

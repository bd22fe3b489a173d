"""Tags: names on DONE runs, unique per workflow (`prepare:latest`)."""

from __future__ import annotations

from sqlalchemy import delete, select

from dstack.core.errors import Conflict, NotFound
from dstack.core.models import JobStatus, Tag
from dstack.core.names import check_tag
from dstack.server.context import Context
from dstack.server.db.tables import RunRow, TagRow
from dstack.server.services.convert import tag_model
from dstack.server.services.run_state import now


async def add_tag(ctx: Context, repo_id: str, run_name: str, tag: str) -> tuple[Tag, str | None]:
    """Tag a run; a tag of the same name on another run of the workflow moves. Returns the run it left."""
    check_name(tag)
    async with ctx.sessions() as s:
        run = await s.get(RunRow, run_name)
        if run is None:
            raise NotFound(f"no run named '{run_name}'", hint="`dstack status` lists runs")
        if run.repo_id != repo_id:  # tags name runs of their own project: say where this one is
            raise NotFound(f"{run_name} is a run of another project ({run.repo_id}), not of this one ({repo_id})",
                           hint="tag it from that project's folder; `dstack status` lists this one's runs")
        if run.status != JobStatus.DONE.value:
            finished = JobStatus(run.status).finished
            raise Conflict(f"run {run_name} is {run.status}; only DONE runs can be tagged",
                           hint="tag a run that succeeded" if finished else "wait for it to finish")
        row, moved_from = await set_tag(s, run, tag)
        await s.commit()
        return tag_model(row), moved_from


def check_name(tag: str) -> None:
    check_tag(tag)


async def set_tag(s, run: RunRow, tag: str) -> tuple[TagRow, str | None]:
    """Put `tag` on `run` (in the session, not committed); returns the run it moved from, if any."""
    old = await s.scalar(select(TagRow).where(TagRow.repo_id == run.repo_id, TagRow.workflow == run.workflow,
                                              TagRow.name == tag))
    if old is not None and old.run_name == run.name:
        return old, None
    moved_from = None
    if old is not None:
        moved_from = old.run_name
        await s.delete(old)
        await s.flush()
    row = TagRow(repo_id=run.repo_id, workflow=run.workflow, name=tag, run_name=run.name, created_at=now())
    s.add(row)
    return row, moved_from


async def remove(ctx: Context, repo_id: str, ref: str) -> list[Tag]:
    """`ref` is a run name (all its tags go), `workflow:tag`, or a tag name."""
    async with ctx.sessions() as s:
        run = await s.get(RunRow, ref)
        q = select(TagRow).where(TagRow.repo_id == repo_id)
        if run is not None and run.repo_id == repo_id:
            q = q.where(TagRow.run_name == ref)
        else:
            workflow, sep, name = ref.rpartition(":")
            q = q.where(TagRow.name == name)
            if workflow:
                q = q.where(TagRow.workflow == workflow)
        rows = (await s.scalars(q)).all()
        if not rows:
            raise NotFound(f"no tag or run '{ref}'", hint="`dstack tags` lists tags")
        if run is None and len({r.workflow for r in rows}) > 1:
            names = ", ".join(f"{r.workflow}:{r.name}" for r in rows)
            raise Conflict(f"tag '{ref}' is on runs of several workflows ({names})", hint="write workflow:tag")
        removed = [tag_model(r) for r in rows]
        await s.execute(delete(TagRow).where(TagRow.id.in_([r.id for r in rows])))
        await s.commit()
        return removed


async def list_tags(ctx: Context, repo_id: str) -> list[Tag]:
    async with ctx.sessions() as s:
        rows = (await s.scalars(select(TagRow).where(TagRow.repo_id == repo_id)
                                .order_by(TagRow.workflow, TagRow.created_at.desc()))).all()
        return [tag_model(r) for r in rows]

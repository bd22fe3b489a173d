"""Saved artifacts: listing, manifests and blobs for downloads, and pruning what nobody needs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import delete, select

from dstack.core.errors import NotFound
from dstack.core.models import FINISHED, JobStatus
from dstack.server.context import Context
from dstack.server.db.tables import InputRow, JobRow, RunRow, TagRow
from dstack.server.services import runs
from dstack.storage.cache import BlobCache
from dstack.storage.gc import collect
from dstack.storage.tree import remove_tree


async def list_artifacts(ctx: Context, repo_id: str | None, ref: str) -> list[dict]:
    run = await runs.get_run(ctx, repo_id, ref)
    jobs = [j for j in run.jobs if j.job_id == ref] or run.jobs
    return [{"job_id": j.job_id, **a} for j in jobs for a in j.artifacts]


async def manifest_json(ctx: Context, digest: str) -> bytes:
    manifest = await asyncio.to_thread(ctx.store.get_manifest, digest)
    return manifest.canonical_json()


async def blob_file(ctx: Context, digest: str) -> Path:
    """A local file holding blob `digest`: the store's own, or a copy fetched into the server's cache."""
    local = ctx.store.local_path(digest)
    if local is not None and local.exists():
        return local
    if local is not None:
        raise NotFound(f"no blob {digest}")
    return await asyncio.to_thread(BlobCache(ctx.settings.home / "server" / "blob-cache").ensure, ctx.store, digest)


async def prune(ctx: Context, repo_id: str, dry_run: bool) -> dict:
    """Delete the finished runs of `repo_id` that are neither tagged nor an input (directly or not) of a
    tagged run; then garbage-collect the store against the manifests of all runs that remain."""
    async with ctx.sessions() as s:
        all_runs = (await s.scalars(select(RunRow).where(RunRow.repo_id == repo_id))).all()
        tagged = set((await s.scalars(select(TagRow.run_name).where(TagRow.repo_id == repo_id))).all())
        inputs: dict[str, set[str]] = {}
        for row in (await s.execute(select(InputRow.run_name, InputRow.input_run))).all():
            inputs.setdefault(row.run_name, set()).add(row.input_run)
        keep = set()
        todo = list(tagged | {r.name for r in all_runs if JobStatus(r.status) not in FINISHED})
        while todo:  # tagged and unfinished runs, and everything they consumed, transitively
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.extend(inputs.get(name, ()))
        doomed = sorted(r.name for r in all_runs if r.name not in keep)
        if doomed and not dry_run:
            job_ids = (await s.scalars(select(JobRow.job_id).where(JobRow.run_name.in_(doomed)))).all()
            await s.execute(delete(InputRow).where(InputRow.run_name.in_(doomed)))
            await s.execute(delete(JobRow).where(JobRow.run_name.in_(doomed)))
            await s.execute(delete(RunRow).where(RunRow.name.in_(doomed)))
            await s.commit()
            for job_id in job_ids:
                (ctx.settings.logs_dir / f"{job_id}.log").unlink(missing_ok=True)
        live = set()  # of every repository: the store is shared
        for saved in (await s.scalars(select(JobRow.saved_artifacts).where(JobRow.run_name.notin_(doomed)))).all():
            live |= {a["manifest"] for a in saved or [] if a.get("manifest")}
        active = await s.scalar(select(JobRow.job_id).where(
            JobRow.status.in_([JobStatus.RUNNING.value, JobStatus.UPLOADING.value])).limit(1))
        live_code = set()
        for code in (await s.scalars(select(RunRow.code).where(RunRow.name.notin_(doomed)))).all():
            live_code |= {h for h in ((code or {}).get(k) for k in ("diff_hash", "files_hash", "archive_hash")) if h}
    # a job saving right now has blobs (and maybe a manifest) the database does not know yet: while any
    # job runs, only data older than the grace period goes
    grace = ctx.settings.gc_grace if active else 0
    result = await asyncio.to_thread(collect, ctx.store, live, grace_seconds=grace, dry_run=dry_run)
    # code blobs: uploaded just before a run is submitted, so always spare the young ones
    code_count, code_bytes = await asyncio.to_thread(ctx.code.collect, live_code, max(grace, 300), dry_run)
    if not dry_run:
        trees = ctx.settings.store_dir / "trees"
        for digest in result.deleted_manifests:
            await asyncio.to_thread(remove_tree, trees / digest)
    return {"runs": doomed, "manifests": len(result.deleted_manifests), "blobs": len(result.deleted_blobs),
            "code_blobs": code_count, "bytes": result.bytes_freed + code_bytes, "dry_run": dry_run}

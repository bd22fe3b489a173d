"""Artifacts of runners that do not share the server's disk: blobs and manifests through the server's HTTP API,
or by presigned URLs of an S3 store that the server hands out (a runner never holds the store's credentials).

What a runner may move, it moves for one of its own jobs that has not finished: it uploads only for a job that
declares artifacts, and downloads only the manifests that the job's dependencies name (`DependencyRef.manifests`
of its spec) and the blobs those manifests name.

An upload through the server streams to `<h>.upload` (in the local store's tmp/, where gc removes it once stale;
else DSTACK_HOME/server/uploads), hashed as it arrives. A cut leaves what arrived: the runner asks where to go on
(`plan_uploads`: `offset`) and sends the rest. When the last byte is in and the bytes hash to the blob's name,
the file is renamed into place (or put into the store); otherwise it is dropped, and the sender told so (400,
kind `integrity`). A file sent while its sender hashes it (`receive_staged`) is held once all of it is in until
the request that names its hash (the hash so far is kept meanwhile: that request reads nothing again)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blake3 import blake3
from sqlalchemy import select

from dstack.core.errors import ConfigError, Conflict, Forbidden, NotFound
from dstack.core.models import FINISHED
from dstack.core.transfers import (
    DownloadUrls,
    Part,
    StoreAccess,
    UploadPlan,
    UploadPlans,
    UploadRequest,
)
from dstack.server.context import Context
from dstack.server.db.tables import JobRow
from dstack.server.services import artifacts
from dstack.storage.blobstore import LocalBlobStore, Presigns, parse_manifest
from dstack.storage.hashing import CHUNK, IntegrityError, check_hash

log = logging.getLogger("dstack.server")

WRITE_SIZE = 4 << 20  # bytes of an upload gathered before one write + hash in a thread
PRESIGNED_PUT_MAX = 64 << 20  # larger blobs go to S3 in parts (each resumable on its own)
PART_SIZE = 64 << 20
_MANIFESTS_KEPT = 64  # the blob sets of this many manifests are kept for download checks
_HELD_KEPT = 256  # uploads held for their hash whose hash so far is kept


def store_access(ctx: Context) -> StoreAccess:
    if isinstance(ctx.store, LocalBlobStore):
        return StoreAccess(type="local", path=str(ctx.store.root), machine_id=machine_id())
    return StoreAccess(type="s3", presigned=isinstance(ctx.store, Presigns))


def machine_id() -> str | None:
    try:
        return Path("/etc/machine-id").read_text().strip() or None
    except OSError:
        return None


# ---- who may move what ----


async def _job_spec(ctx: Context, runner: str, job_id: str) -> dict:
    async with ctx.sessions() as s:
        row = (await s.execute(select(JobRow.spec, JobRow.status, JobRow.runner_name)
                               .where(JobRow.job_id == job_id))).first()
    if row is None or row.runner_name != runner or row.status in {j.value for j in FINISHED}:
        raise Forbidden(f"runner {runner} runs no unfinished job {job_id}",
                        hint="a runner moves artifacts only for its own jobs, while they run")
    return row.spec or {}


async def may_upload(ctx: Context, runner: str, job_id: str) -> None:
    spec = await _job_spec(ctx, runner, job_id)
    if not spec.get("artifacts"):
        raise Forbidden(f"job {job_id} saves no artifacts", hint="its workflow declares no `artifacts`")


def _dependency_manifests(spec: dict) -> set[str]:
    return {d for dep in spec.get("dependencies") or [] for d in (dep.get("manifests") or {}).values()}


async def may_read_manifest(ctx: Context, runner: str, job_id: str, digest: str) -> None:
    if digest not in _dependency_manifests(await _job_spec(ctx, runner, job_id)):
        raise Forbidden(f"manifest {digest[:12]} is not a dependency of job {job_id}")


async def may_read_blobs(ctx: Context, runner: str, job_id: str, hashes: list[str]) -> None:
    wanted = set(hashes)
    await _job_spec(ctx, runner, job_id)  # the runner's own job, even when it asks for nothing
    if not wanted:
        return
    for digest in sorted(_dependency_manifests(await _job_spec(ctx, runner, job_id))):
        wanted -= await _blobs_of(ctx, digest)
        if not wanted:
            return
    raise Forbidden(f"blob {min(wanted)[:12]} is in no dependency of job {job_id}"
                    + (f" (nor are {len(wanted) - 1} more)" if len(wanted) > 1 else ""))


_blob_sets: OrderedDict[str, frozenset[str]] = OrderedDict()


async def _blobs_of(ctx: Context, digest: str) -> frozenset[str]:
    """The blobs manifest `digest` names (a manifest never changes: kept for the next check)."""
    found = _blob_sets.get(digest)
    if found is None:
        try:
            manifest = await asyncio.to_thread(ctx.store.get_manifest, digest)
        except NotFound:
            return frozenset()
        found = frozenset(e.hash for e in manifest.entries if e.kind == "file" and e.hash)
        _blob_sets[digest] = found
        while len(_blob_sets) > _MANIFESTS_KEPT:
            _blob_sets.popitem(last=False)
    else:
        _blob_sets.move_to_end(digest)
    return found


# ---- downloads ----


async def download_urls(ctx: Context, runner: str, job_id: str, hashes: list[str]) -> DownloadUrls:
    await may_read_blobs(ctx, runner, job_id, hashes)
    store = ctx.store
    if not isinstance(store, Presigns):
        return DownloadUrls()
    return DownloadUrls(urls={h: store.presign_get(h) for h in hashes})  # signing is local: no request


async def blob_file(ctx: Context, runner: str, job_id: str, h: str) -> Path:
    await may_read_blobs(ctx, runner, job_id, [check_hash(h)])
    return await artifacts.blob_file(ctx, h)


async def manifest_json(ctx: Context, runner: str, job_id: str, digest: str) -> bytes:
    await may_read_manifest(ctx, runner, job_id, check_hash(digest))
    return await artifacts.manifest_json(ctx, digest)


# ---- uploads ----


def _uploads(ctx: Context) -> Path:
    if isinstance(ctx.store, LocalBlobStore):
        return ctx.store.tmp  # the store's own filesystem: the finished upload is renamed into place
    folder = ctx.settings.home / "server" / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _partial(ctx: Context, h: str) -> Path:
    return _uploads(ctx) / f"{check_hash(h)}.upload"


async def plan_uploads(ctx: Context, runner: str, job_id: str, req: UploadRequest) -> UploadPlans:
    await may_upload(ctx, runner, job_id)
    store = ctx.store

    def plan(h: str, size: int | None) -> UploadPlan:
        if store.has(h, touch=True):  # touched: gc's grace protects it until the manifest names it
            return UploadPlan(hash=h, stored=True)
        if size is None:
            return UploadPlan(hash=h)
        if isinstance(store, Presigns):
            if size <= PRESIGNED_PUT_MAX:
                return UploadPlan(hash=h, url=store.presign_put(h, size))
            upload_id = store.start_parts(h)
            done = store.uploaded_parts(h, upload_id)
            part = max(PART_SIZE, -(-size // 10_000))  # S3 takes 10,000 parts at most
            parts = []
            for i, start in enumerate(range(0, size, part), start=1):
                n = min(part, size - start)
                if done.get(i, ("", -1))[1] != n:
                    parts.append(Part(number=i, url=store.presign_part(h, upload_id, i), size=n))
            return UploadPlan(hash=h, upload_id=upload_id, part_size=part, parts=parts, done=sorted(done))
        try:
            have = _partial(ctx, h).stat().st_size
        except FileNotFoundError:
            have = 0
        return UploadPlan(hash=h, offset=have if have <= size else 0)

    blobs = req.blobs
    if len(blobs) <= 1:
        plans = [await asyncio.to_thread(plan, b.hash, b.size) for b in blobs]
    else:
        with ThreadPoolExecutor(store.concurrency) as pool:
            plans = await asyncio.to_thread(lambda: list(pool.map(lambda b: plan(b.hash, b.size), blobs)))
    return UploadPlans(blobs=plans)


async def complete_parts(ctx: Context, runner: str, job_id: str, h: str, upload_id: str, size: int) -> None:
    await may_upload(ctx, runner, job_id)
    store = ctx.store
    if not isinstance(store, Presigns):
        raise Conflict("this server's store takes no uploads in parts", hint="PUT the blob to the server")
    await asyncio.to_thread(store.finish_parts, check_hash(h), upload_id, size)


async def receive_blob(ctx: Context, runner: str, job_id: str, h: str, offset: int, size: int,
                       chunks: AsyncIterable[bytes]) -> dict:
    """Bytes [offset, ...) of blob `h` (`size` bytes in all). Answers {"stored": true} once the blob is in
    the store (it was already: the bytes are read and dropped)."""
    await may_upload(ctx, runner, job_id)
    check_hash(h)
    if await asyncio.to_thread(ctx.store.has, h, touch=True):
        async for _ in chunks:
            pass
        return {"stored": True}
    await _receive(ctx, _partial(ctx, h), f"blob {h[:12]}", h, offset, size, chunks)
    return {"stored": True}


def _staged(ctx: Context, upload_id: str) -> Path:
    if len(upload_id) != 32 or upload_id.strip("0123456789abcdef"):
        raise ConfigError(f"'{upload_id[:40]}' is not an upload id (32 hex digits)")
    return _uploads(ctx) / f"staged-{upload_id}.upload"


async def staged_offset(ctx: Context, runner: str, job_id: str, upload_id: str) -> dict:
    await may_upload(ctx, runner, job_id)
    try:
        return {"offset": _staged(ctx, upload_id).stat().st_size}
    except FileNotFoundError:
        return {"offset": 0}


async def receive_staged(ctx: Context, runner: str, job_id: str, upload_id: str, offset: int, size: int,
                         chunks: AsyncIterable[bytes], hold: bool = False, expected: str | None = None) -> dict:
    """A blob sent before its sender knows its hash (it hashes the file while it sends it): bytes [offset, ...)
    of upload `upload_id` (the sender's random name for it), `size` in all. `hold`: once all are in, keep them
    ({"stored": false, "offset": size}) for a request that names their hash (`expected`, with the bytes left to
    send, none at all when the server holds them all): stored if they hash to it, else dropped (400). Without
    either, stored under the hash of what came, which the answer says ({"stored": true, "hash": ...})."""
    await may_upload(ctx, runner, job_id)
    if expected is not None:
        check_hash(expected)
    h = await _receive(ctx, _staged(ctx, upload_id), f"upload {upload_id[:12]}", expected, offset, size, chunks,
                       hold=hold and expected is None)
    return {"stored": False, "offset": size} if h is None else {"stored": True, "hash": h}


_held: OrderedDict[Path, tuple[int, int, blake3]] = OrderedDict()  # part -> (inode, size, the hash of its bytes)


async def _receive(ctx: Context, part: Path, what: str, expected: str | None, offset: int, size: int,
                   chunks: AsyncIterable[bytes], hold: bool = False) -> str | None:
    """Append what arrives to `part` from `offset` (which must be what it holds, or 0 to start over), hashing
    it; once all `size` bytes are in, store them as the blob their hash names (which must be `expected`, when
    given: else they are dropped). Returns that hash; None when `hold` (all in, kept for a request that names
    their hash)."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"another upload of {what} is under way", hint="try again shortly") from None
        st = os.fstat(fd)
        try:
            current = os.stat(part).st_ino == st.st_ino
        except FileNotFoundError:
            current = False
        if not current:  # opened just before the upload that held the lock stored or dropped it
            raise Conflict(f"another upload of {what} just ended", hint="ask the server where to go on")
        have = st.st_size
        if offset == 0 and have:
            os.ftruncate(fd, 0)  # start over
            have = 0
        elif offset != have:
            raise Conflict(f"the server holds {have} bytes of {what}, not {offset}",
                           hint="ask the server where to go on")
        kept = _held.pop(part, None)
        if kept is not None and kept[:2] == (st.st_ino, have):
            hasher = kept[2]  # the bytes held, hashed as they came
        else:
            hasher = blake3()
            if have:
                await asyncio.to_thread(_hash_prefix, fd, have, hasher)
        have = await _append(fd, hasher, have, size, chunks)
        if have != size:
            raise Conflict(f"the upload of {what} ended at {have} of {size} bytes",
                           hint=f"send the rest from offset {have}")
        if hold:
            _held[part] = (st.st_ino, size, hasher)
            while len(_held) > _HELD_KEPT:
                _held.popitem(last=False)
            return None
        got = hasher.hexdigest()
        if expected is not None and got != expected:
            part.unlink(missing_ok=True)  # nothing of it is kept (the lock is ours: no upload writes to it)
            raise IntegrityError(f"the bytes sent as {what} hash to {got[:12]}, not {expected[:12]}: the server "
                                 "dropped them", hint="send them again; when that fails too, the file changes while "
                                 "it is sent, or something on the way alters what is sent")
        if await asyncio.to_thread(ctx.store.has, got, touch=True):
            part.unlink(missing_ok=True)
        else:
            await asyncio.to_thread(_publish, ctx.store, fd, part, got, size)
        return got
    finally:
        os.close(fd)


async def _append(fd: int, hasher: blake3, have: int, size: int, chunks: AsyncIterable[bytes]) -> int:
    """Write and hash what arrives after the `have` bytes the file holds, a batch at a time in a thread while
    the next batch arrives; what arrived stays when the stream breaks off (the rest comes later). Returns the
    bytes held then."""
    batch: list[bytes] = []
    batched = 0
    writing: asyncio.Future | None = None  # the batch before: written and hashed meanwhile
    try:
        async for chunk in chunks:
            if have + batched + len(chunk) > size:
                raise IntegrityError(f"more bytes than the {size} announced")
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_SIZE:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(_write, fd, hasher, batch, have))
                have, batch, batched = have + batched, [], 0
    finally:
        if writing is not None:
            await writing
        if batch:
            await asyncio.to_thread(_write, fd, hasher, batch, have)
            have += batched
    return have


def _write(fd: int, hasher: blake3, chunks: list[bytes], offset: int) -> None:
    """Hash and write the chunks at `offset` (one writev, no copy into a buffer of our own)."""
    for c in chunks:
        hasher.update(c)
    views = [memoryview(c) for c in chunks]
    while views:
        n = os.pwritev(fd, views[:1024], offset)  # IOV_MAX
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _hash_prefix(fd: int, size: int, hasher: blake3) -> None:
    pos = 0
    while pos < size:
        data = os.pread(fd, min(CHUNK, size - pos), pos)
        if not data:
            raise IntegrityError("an unfinished upload shrank")
        hasher.update(data)
        pos += len(data)


def _publish(store, fd: int, part: Path, h: str, size: int) -> None:
    if isinstance(store, LocalBlobStore):
        os.fchmod(fd, 0o444)
        os.rename(part, store.local_path(h))  # the same content may be there already: the same bytes
    else:
        store.put_file(fd, h, size)
        part.unlink(missing_ok=True)


async def receive_manifest(ctx: Context, runner: str, job_id: str, digest: str, data: bytes) -> None:
    """A manifest, stored once the store has every blob it names (the manifest is what makes the artifact
    exist, so it comes last)."""
    await may_upload(ctx, runner, job_id)
    manifest = parse_manifest(data, check_hash(digest))
    if manifest.digest() != digest:
        raise IntegrityError(f"manifest {digest[:12]} is not in canonical form", hint="send Manifest.canonical_json()")
    hashes = sorted({e.hash for e in manifest.entries if e.kind == "file" and e.size and e.hash})
    store = ctx.store

    def missing() -> list[str]:
        with ThreadPoolExecutor(store.concurrency) as pool:
            return [h for h, ok in zip(hashes, pool.map(lambda h: store.has(h, touch=True), hashes), strict=True)
                    if not ok]

    lacking = await asyncio.to_thread(missing)
    if lacking:
        raise Conflict(f"manifest {digest[:12]} names {len(lacking)} blob(s) the store lacks (first {lacking[0][:12]})",
                       hint="upload its blobs first")
    await asyncio.to_thread(store.put_manifest, manifest)

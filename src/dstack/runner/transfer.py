"""How a runner reaches the artifact store: the store's folder itself when it runs on the server's machine and
may open it (zero-copy: hard links), else the server's transfer API (server/routers/transfers.py) for one job
at a time, with presigned URLs of an S3 store where the server hands them out. The runner never holds the
store's credentials or relies on its paths.

Transfers are content-addressed, verified and resumable: a download is written to `.<name>.part` beside its
destination and goes on from there after a cut (a Range request; the bytes there are hashed again first), and
the whole is checked against the blob's BLAKE3 before it is renamed into place (a blob that comes wrong comes
again, ATTEMPTS times in all); an upload goes on from the offset the server says it holds, and goes again when
the server refuses bytes that do not hash to their name. An expired presigned URL (S3 refuses it) is asked for
again; one refused even when fresh, REFUSALS times, ends the transfer with an error that says so. Blobs move in
parallel (the callers' thread pools, `concurrency` threads)."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import httpx
from blake3 import blake3

from dstack.core.errors import Conflict, DstackError
from dstack.core.manifest import Manifest
from dstack.core.transfers import MAX_BLOBS, DownloadUrls, StoreAccess, UploadPlan, UploadPlans
from dstack.runner.blob_http import (
    CUT,
    Connections,
    Refused,
    Restart,
    Stopped,
    Unreachable,
    get_into,
    put_from,
)
from dstack.runner.client import RETRYABLE, ServerClient, ServerTrouble, raise_for
from dstack.storage.blobstore import LocalBlobStore, ingest_fd, parse_manifest
from dstack.storage.hashing import CHUNK, IntegrityError, check_hash, hash_bytes, hash_fd

log = logging.getLogger("dstack.runner")

SEND_WHILE_HASHING = 64 << 20  # files from this size on go up while they are hashed
PATIENCE = 600.0  # seconds a transfer waits for a server (or S3) that cannot take it, without progress
URL_LIFETIME = 3000.0  # seconds a presigned URL is used (the server signs them for 3600)
ATTEMPTS = 3  # times a blob is sent (fetched) while what arrives does not hash to its name
REFUSALS = 5  # presigned URLs of a blob that the store may refuse in a row, fresh ones too, before giving up
CLOCKS = ("a presigned URL expires by the clock of the store: the server's clock (which signs them) and the "
          "store's must agree (NTP); the server's credentials must also allow it to read and write the bucket")
ALTERED = ("make sure no process of the job still writes to its artifacts when it ends; else something between "
           "the runner and the server alters what is sent")


class Altered(IntegrityError):
    """The server refused bytes that do not hash to the name they were sent under (it kept none of them)."""


def open_store(client: ServerClient, workdir: Path, workers: int = 8) -> LocalBlobStore | Transfers:
    """The store's folder when the server says where it is, this is its machine and the runner can use it;
    otherwise transfers through the server."""
    access = StoreAccess.model_validate(client.store_config())
    local = usable_folder(access)
    if local is not None:
        log.info("artifact store: %s (on this machine: hard links, no copies)", local)
        return LocalBlobStore(local)
    log.info("artifact store: through the server%s", " (presigned URLs of its S3 store)" if access.presigned else "")
    return Transfers(client, access.presigned, workers)


def usable_folder(access: StoreAccess) -> Path | None:
    """The store's folder, if it is on this machine and this runner may read and write it."""
    if access.type != "local" or not access.path:
        return None
    if access.machine_id and access.machine_id != _machine_id():
        return None
    root = Path(access.path)
    for sub in ("blobs", "manifests", "tmp"):
        if not os.access(root / sub, os.R_OK | os.W_OK | os.X_OK):
            return None
    return root


def _machine_id() -> str | None:
    try:
        return Path("/etc/machine-id").read_text().strip() or None
    except OSError:
        return None


class Transfers:
    """The runner's connections for transfers; `for_job` gives the store of one job."""

    def __init__(self, client: ServerClient, presigned: bool, workers: int = 8):
        limits = httpx.Limits(max_connections=2 * workers, max_keepalive_connections=2 * workers)
        self.server = httpx.Client(base_url=client.http.base_url, headers=dict(client.http.headers),
                                   timeout=httpx.Timeout(60.0, connect=10.0), limits=limits)  # requests in JSON
        self.url = str(client.http.base_url).rstrip("/")
        self.auth = {"Authorization": client.http.headers["authorization"]}
        self.conns = Connections()  # blobs' bytes
        self.presigned = presigned
        self.workers = workers

    def for_job(self, runner: str, job_id: str) -> JobStore:
        return JobStore(self, runner, job_id)

    def close(self) -> None:
        self.server.close()


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.downloaded = self.downloaded_bytes = self.resumed_bytes = 0
        self.uploaded = self.uploaded_bytes = 0

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class JobStore:
    """The store as one job of this runner sees it through the server: it saves that job's artifacts and reads
    its dependencies (a BlobStore for save_tree, materialise and tree_cache)."""

    def __init__(self, transfers: Transfers, runner: str, job_id: str):
        self.t = transfers
        self.concurrency = transfers.workers
        self.base = f"/api/runners/{runner}/jobs/{job_id}"
        self.stats = Stats()
        self._lock = threading.Lock()
        self._stored: set[str] = set()
        self._wanted: set[str] = set()  # blobs of the manifests read: their URLs are asked for together
        self._urls: dict[str, tuple[str, float]] = {}
        self._direct = transfers.presigned

    def __repr__(self) -> str:
        return f"JobStore({self.t.server.base_url}{self.base})"

    # -- the server's answers, patiently --

    def _call(self, what: str, fn: Callable[[], httpx.Response]) -> httpx.Response:
        """fn()'s answer, tried again while the server cannot take it (unreachable, restarting, stopping)."""
        pause, since = 0.2, time.monotonic()
        while True:
            try:
                return raise_for(fn())
            except RETRYABLE as e:
                if time.monotonic() - since > PATIENCE:
                    raise DstackError(f"could not {what}: {e}") from None
                log.warning("could not %s: %s; trying again", what, e)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _plans(self, blobs: list[tuple[str, int | None]]) -> list[UploadPlan]:
        body = {"blobs": [{"hash": h, "size": n} for h, n in blobs]}
        r = self._call("ask which blobs the store lacks", lambda: self.t.server.post(f"{self.base}/uploads", json=body))
        return UploadPlans.model_validate(r.json()).blobs

    # -- saving --

    def has(self, h: str, *, touch: bool = False) -> bool:
        if h in self._stored:
            return True
        if self._plans([(check_hash(h), None)])[0].stored:
            self._stored.add(h)
            return True
        return False

    def ingest(self, fd: int, size: int, check: Callable[[], None] | None = None) -> str:
        """Store the file unless the store has it; its hash. A large one goes to the server while it is hashed
        (the server names it by the hash of what came, which must be ours), and stops going once the hash
        shows that the store has it."""
        if size < SEND_WHILE_HASHING or self._direct:
            return ingest_fd(self, fd, size, check)
        hashed: dict = {}
        stop = threading.Event()

        def hash_then_look() -> None:
            try:
                hashed["h"] = hash_fd(fd, size, threads=1)
                if check is not None:
                    check()
                if self.has(hashed["h"]):
                    stop.set()
            except BaseException as e:  # raised by the caller, below
                hashed["error"] = e
                stop.set()

        def digest() -> str:
            hasher.join()
            if "error" in hashed:
                raise hashed["error"]
            return hashed["h"]

        hasher = threading.Thread(target=hash_then_look, name="dstack-hash", daemon=True)
        hasher.start()
        try:
            self._upload_staged(fd, size, stop, digest, check)
        finally:
            hasher.join()
        h = digest()
        if check is not None:
            check()
        self._stored.add(h)
        return h

    def _upload_staged(self, fd: int, size: int, stop: threading.Event, digest: Callable[[], str],
                       check: Callable[[], None] | None = None) -> None:
        """PUT the file to the server under a name of our own while `digest()` hashes it; the server holds the
        bytes until a last request names their hash, and stores them if they hash to it (else drops them: they
        go again, with their hash from the start, unless `check` says the file changed). Returns once stored, or
        stopped (the store has the blob)."""
        h = None
        for attempt in range(1, ATTEMPTS + 1):
            upload_id = uuid.uuid4().hex
            try:
                if h is None:
                    if not self._send_staged(upload_id, fd, 0, size, stop, {"hold": "true"}):
                        return
                    h = digest()
                    if stop.is_set():  # the store has it
                        return
                    self._send_staged(upload_id, fd, size, size, None, {"hash": h})  # held: only its hash goes
                else:
                    self._send_staged(upload_id, fd, 0, size, None, {"hash": h})
                self.stats.add(uploaded=1)
                return
            except Altered as e:
                if attempt == ATTEMPTS:
                    raise IntegrityError(f"the server refused a file of {size} bytes {ATTEMPTS} times, as what came "
                                         f"did not hash to {h[:12]}: {e.message}", hint=ALTERED) from None
                if check is not None:
                    check()
                log.warning("the server refused a file of %d bytes (%s); sending it again", size, e.message)

    def _send_staged(self, upload_id: str, fd: int, offset: int, size: int, stop: threading.Event | None,
                     params: dict[str, str]) -> bool:
        """PUT the file from `offset` as upload `upload_id`; after a cut, on from where the server says it is.
        False when stopped; Altered when the server refused what came."""
        pause, since = 0.2, time.monotonic()
        while True:
            url = f"{self.t.url}{self.base}/staged/{upload_id}?offset={offset}&size={size}&{urlencode(params)}"
            try:
                put_from(self.t.conns, url, {**self.t.auth, "Content-Type": "application/octet-stream"}, fd,
                         offset, size, stop)
                self.stats.add(uploaded_bytes=size - offset)
                return True
            except Stopped:
                return False
            except Refused as e:
                if e.kind == IntegrityError.kind:
                    raise Altered(e.detail) from None
                error: Exception = e.as_ours()
                if not isinstance(error, (ServerTrouble, Conflict)):
                    raise error from None
            except (*CUT, Unreachable) as e:
                error = e
            if stop is not None and stop.is_set():
                return False
            if time.monotonic() - since > PATIENCE:
                raise DstackError(f"could not upload a file: {error}") from None
            log.warning("upload of a file broke off (%s); going on", error)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
            r = self._call("ask where an upload stands", lambda: self.t.server.get(f"{self.base}/staged/{upload_id}"))
            held = int(r.json()["offset"])
            if held > offset:
                since = time.monotonic()
                self.stats.add(uploaded_bytes=held - offset)
            offset = held

    def put_bytes(self, data: bytes, h: str, *, trusted: bool = False) -> None:
        if not trusted and hash_bytes(data) != check_hash(h):
            raise IntegrityError(f"data given as blob {h} has another hash")
        plan = UploadPlan(hash=h) if not self._direct else self._plans([(h, len(data))])[0]
        self._upload(plan, len(data), memoryview(data))

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        self._upload(self._plans([(check_hash(h), size)])[0], size, fd)
        if check is not None:
            check()

    def _upload(self, plan: UploadPlan, size: int, source: int | memoryview) -> None:
        h = plan.hash
        if plan.stored:
            self._stored.add(h)
            return
        sent = None
        if self._direct and (plan.url or plan.upload_id):
            sent = self._upload_direct(plan, size, source)
        if sent is None:
            sent = self._upload_to_server(h, plan.offset if not (plan.url or plan.upload_id) else 0, size, source)
        self._stored.add(h)
        self.stats.add(uploaded=1, uploaded_bytes=sent)

    def _upload_to_server(self, h: str, offset: int, size: int, source: int | memoryview) -> int:
        """PUT the blob's bytes from `offset`; after a cut, on from where the server says it is; again from the
        start when the server refused what came (it did not hash to `h`). Bytes sent."""
        sent, pause, since, altered = 0, 0.2, time.monotonic(), 0
        while True:
            url = f"{self.t.url}{self.base}/blobs/{h}?offset={offset}&size={size}"
            try:
                put_from(self.t.conns, url, {**self.t.auth, "Content-Type": "application/octet-stream"}, source,
                         offset, size)
                return sent + size - offset
            except Refused as e:
                if e.kind == IntegrityError.kind:  # the server dropped all it held of it
                    altered += 1
                    sent += size - offset
                    if altered == ATTEMPTS:
                        raise IntegrityError(f"the server refused blob {h[:12]} {ATTEMPTS} times, as what came did not "
                                             f"hash to its name: {e.detail}", hint=ALTERED) from None
                    log.warning("the server refused blob %s (%s); sending it again", h[:12], e.detail)
                    offset = 0
                    continue
                error: Exception = e.as_ours()
                if not isinstance(error, (ServerTrouble, Conflict)):  # away for now; another upload under way
                    raise error from None
            except (*CUT, Unreachable) as e:  # a cut, the server away
                error = e
            if time.monotonic() - since > PATIENCE:
                raise DstackError(f"could not upload blob {h[:12]}: {error}") from None
            log.warning("upload of blob %s broke off (%s); going on", h[:12], error)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
            plan = self._plans([(h, size)])[0]
            if plan.stored:
                return sent
            if plan.offset > offset:
                since = time.monotonic()  # progress
                sent += plan.offset - offset
            offset = plan.offset

    def _upload_direct(self, plan: UploadPlan, size: int, source: int | memoryview) -> int | None:
        """Up by the presigned URLs of the plan: the whole blob, or its missing parts then `complete`; when the
        store refuses a URL (expired), by those of a fresh plan. Bytes sent; None when S3 cannot be reached from
        here (the server takes it instead)."""
        h, sent, refused, pause = plan.hash, 0, 0, 0.2
        while True:
            try:
                if plan.url:
                    self._put_direct(plan.url, source, 0, size)
                    return sent + size
                for p in plan.parts:
                    start = (p.number - 1) * plan.part_size
                    self._put_direct(p.url, source, start, start + p.size)
                    sent += p.size
                break
            except Unreachable as e:
                log.warning("cannot reach the store's presigned URLs (%s): blobs go through the server", e)
                self._direct = False
                return None
            except Refused as e:  # an expired URL, or an upload in parts that gc aborted: ask for a fresh plan
                refused += 1
                if refused == REFUSALS:
                    raise DstackError(f"the store refused the presigned URLs for blob {h[:12]} {REFUSALS} times, "
                                      f"fresh ones too ({e.status}: {e.detail})", hint=CLOCKS) from None
                log.warning("the store refused a presigned URL for blob %s (%d: %s); asking for a fresh one",
                            h[:12], e.status, e.detail)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                plan = self._plans([(h, size)])[0]
                if plan.stored:
                    return sent
                if not (plan.url or plan.upload_id):
                    return None
        self._call(f"complete the upload of blob {h[:12]}", lambda: self.t.server.post(
            f"{self.base}/blobs/{h}/complete", json={"upload_id": plan.upload_id, "size": size}))
        return sent

    def _put_direct(self, url: str, source: int | memoryview, start: int, end: int) -> None:
        """PUT bytes [start, end) to a presigned URL, again after cuts and 5xx answers; Refused for a 4xx."""
        pause, since = 0.2, time.monotonic()
        while True:
            try:
                put_from(self.t.conns, url, {}, source, start, end)
                return
            except Refused as e:
                if e.status < 500:
                    raise
                error: Exception = e
            except CUT as e:
                error = e
            if time.monotonic() - since > PATIENCE:
                raise DstackError(f"could not upload to the store: {error}") from None
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def put_manifest(self, m: Manifest) -> str:
        digest, data = m.digest(), m.canonical_json()
        self._call(f"save manifest {digest[:12]}", lambda: self.t.server.put(
            f"{self.base}/manifests/{digest}", content=data, headers={"Content-Type": "application/json"}))
        return digest

    # -- reading dependencies --

    def get_manifest(self, digest: str) -> Manifest:
        r = self._call(f"read manifest {digest[:12]}", lambda: self.t.server.get(f"{self.base}/manifests/{digest}"))
        manifest = parse_manifest(r.content, check_hash(digest))
        with self._lock:
            self._wanted |= {e.hash for e in manifest.entries if e.kind == "file" and e.size and e.hash}
        return manifest

    def local_path(self, h: str) -> Path | None:
        return None

    def _url(self, h: str) -> tuple[str, dict[str, str]]:
        """Where to GET blob `h`, and with which headers: a presigned URL (asked for with those of the other
        blobs of the manifests read, in one request), or the server."""
        server = (f"{self.t.url}{self.base}/blobs/{h}", self.t.auth)
        if not self._direct:
            return server
        now = time.monotonic()
        with self._lock:
            known = self._urls.get(h)
            if known is not None and now - known[1] < URL_LIFETIME:
                return known[0], {}
            ask = [h] + sorted(x for x in self._wanted - {h}
                               if x not in self._urls or now - self._urls[x][1] >= URL_LIFETIME)[:MAX_BLOBS - 1]
            r = self._call("ask for download URLs", lambda: self.t.server.post(f"{self.base}/downloads",
                                                                             json={"hashes": ask}))
            urls = DownloadUrls.model_validate(r.json()).urls
            self._urls.update({x: (u, now) for x, u in urls.items()})
            if h not in urls:  # the store has no presigned URLs after all
                self._direct = False
                return server
            return urls[h], {}

    def fetch(self, h: str, dest: Path) -> None:
        """Blob `h` into the new file `dest` (0444), verified; resumed from `.<name>.part` beside it, which a
        cut (or a runner killed) leaves behind."""
        check_hash(h)
        dest = Path(dest)
        part = dest.with_name(f".{dest.name}.part")
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another thread or runner fetching it: wait, then it is there
            if dest.exists():
                return
            kept = os.fstat(fd).st_size
            got, hasher, kept = self._download(h, fd, kept)
            if hasher.hexdigest() != h and kept:
                log.warning("the %d bytes of blob %s kept from a cut download were wrong: fetching it afresh",
                            kept, h[:12])
                os.ftruncate(fd, 0)
                more, hasher, kept = self._download(h, fd, 0)
                got += more
            tries = 1
            while hasher.hexdigest() != h:
                os.ftruncate(fd, 0)  # nothing of it is kept
                if tries == ATTEMPTS:
                    raise IntegrityError(f"blob {h} is corrupt: it came {ATTEMPTS} times, and hashed to "
                                         f"{hasher.hexdigest()[:12]} the last time", hint="the store's copy may be "
                                         "damaged, or something between the runner and the store alters what comes")
                log.warning("blob %s came corrupt (it hashes to %s); fetching it again", h[:12],
                            hasher.hexdigest()[:12])
                more, hasher, kept = self._download(h, fd, 0)
                got += more
                tries += 1
            self.stats.add(downloaded=1, downloaded_bytes=got, resumed_bytes=kept)
            os.fchmod(fd, 0o444)
            os.rename(part, dest)
        finally:
            os.close(fd)

    def _download(self, h: str, fd: int, have: int) -> tuple[int, blake3, int]:
        """Write the blob from byte `have` (the bytes `fd` holds) on, going on after cuts. Returns the bytes
        downloaded, the hash of the whole, and how many bytes of what `fd` held were kept."""
        hasher, kept = blake3(), have
        _hash_prefix(fd, have, hasher)
        got, pause, since, total, refused = 0, 0.2, time.monotonic(), None, 0
        while total is None or have < total:
            url, headers = self._url(h)
            direct = not headers
            before = have
            try:
                have, total = get_into(self.t.conns, url, headers, fd, have, hasher)
                got += have - before
                refused = 0
                continue
            except Restart:
                hasher, have, kept = blake3(), 0, 0
                continue
            except Unreachable as e:
                if direct:
                    log.warning("cannot reach the store's presigned URLs (%s): blobs come through the server", e)
                    self._direct = False
                    continue
                error: Exception = e
            except Refused as e:
                if direct and e.status in (400, 403):  # an expired URL: ask again
                    refused += 1
                    if refused == REFUSALS:
                        raise DstackError(f"the store refused the presigned URLs of blob {h[:12]} {REFUSALS} times, "
                                          f"fresh ones too ({e.status}: {e.detail})", hint=CLOCKS) from None
                    with self._lock:
                        self._urls.pop(h, None)
                    error = e
                else:
                    error = e.as_ours()
                    if not isinstance(error, ServerTrouble):
                        raise error from None
            except CUT as e:
                error = e
            got += max(0, _held(fd) - before)
            have = _held(fd)
            if have > before:
                since = time.monotonic()
            if time.monotonic() - since > PATIENCE:
                raise DstackError(f"could not download blob {h[:12]}: {error}") from None
            log.warning("download of blob %s broke off at %d bytes (%s); going on", h[:12], have, error)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
        return got, hasher, kept

    # -- what a runner does not do --

    def _not_here(self, *_a, **_kw):
        raise DstackError("a runner cannot list or delete what the store holds")

    has_manifest = iter_blobs = delete_blobs = iter_manifests = delete_manifest = _not_here
    iter_stale_uploads = delete_stale_upload = _not_here


def _held(fd: int) -> int:
    return os.fstat(fd).st_size


def _hash_prefix(fd: int, size: int, hasher: blake3) -> None:
    pos = 0
    while pos < size:
        data = os.pread(fd, min(CHUNK, size - pos), pos)
        if not data:
            break
        hasher.update(data)
        pos += len(data)

"""Garbage collection of the store: manifests nobody needs, blobs no manifest needs, uploads that
never finished.

The caller (the server) says which manifests are live. Everything else must also be older than
the grace period before it goes, because a save in flight writes blobs first and its manifest last,
and reports the manifest to the server after that. A save that reuses a stored blob touches it
(`has(touch=True)`), so the grace period protects reused blobs too. The grace period must be
longer than the longest save (from its first blob to its report to the server), and well above
TOUCH_AFTER; a grace of 0 is for stores that nothing writes to meanwhile (tests, maintenance)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import NamedTuple

from dstack.storage.blobstore import TOUCH_AFTER, BlobStore

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


class GcResult(NamedTuple):
    deleted_manifests: list[str]
    deleted_blobs: list[str]
    bytes_freed: int
    aborted_uploads: list[str]


def collect(store: BlobStore, live_manifest_digests: Iterable[str], grace_seconds: float = 3600, *,
            dry_run: bool = False) -> GcResult:
    """Delete manifests not in `live_manifest_digests`, blobs no remaining manifest references, and
    leftovers of killed uploads, each only once older than `grace_seconds`. `dry_run`: delete
    nothing, return what would go."""
    if 0 < grace_seconds < 2 * TOUCH_AFTER:
        log.warning("gc grace period %ss is short: a blob reused by a save in flight is touched only when "
                    "older than %ss, so it may be deleted under that save", grace_seconds, TOUCH_AFTER)
    cutoff = time.time() - grace_seconds
    live = set(live_manifest_digests)
    manifests = list(store.iter_manifests())
    dead = [m for m in manifests if m.name not in live and m.mtime < cutoff]
    dead_names = {m.name for m in dead}
    referenced: set[str] = set()
    for m in manifests:
        if m.name not in dead_names:
            # a manifest that cannot be read stops gc: never delete blobs that may be needed
            referenced |= store.get_manifest(m.name).blobs()
    freed = sum(m.size for m in dead)
    if not dry_run:
        for m in dead:
            store.delete_manifest(m.name)

    blobs = {b.name: b for b in store.iter_blobs() if _is_hash(b.name)}
    garbage = sorted(h for h, b in blobs.items() if h not in referenced and b.mtime < cutoff)
    deleted = garbage if dry_run else store.delete_blobs(garbage, older_than=cutoff)
    freed += sum(blobs[h].size for h in deleted)

    stale = list(store.iter_stale_uploads(cutoff))
    if not dry_run:
        for u in stale:
            store.delete_stale_upload(u.name)
    freed += sum(u.size for u in stale)
    if deleted or dead or stale:
        log.info("gc%s: %d manifests, %d blobs, %d unfinished uploads, %d bytes",
                 " (dry run)" if dry_run else "", len(dead), len(deleted), len(stale), freed)
    return GcResult(sorted(dead_names), list(deleted), freed, [u.name for u in stale])


def _is_hash(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX

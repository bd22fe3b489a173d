"""The store in an S3 bucket (AWS, or any S3-compatible server through `endpoint_url`).

Layout under `prefix`: blobs/<h>, manifests/<digest>.json. A PUT (or a completed multipart upload)
is atomic, so a reader sees a whole object or none; uploads that never complete are aborted by gc.
Large files go up and down in parts, several at once (boto3's transfer manager); every download is
verified against its hash before it is renamed into place."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from dstack.core.errors import DstackError, NotFound
from dstack.storage.blobstore import (
    BlobInfo,
    IntegrityError,
    check_hash,
    hash_bytes,
    hash_fd,
    parse_manifest,
    write_verified,
)
from dstack.storage.manifest import Manifest

MiB = 1 << 20
TOUCH_AFTER = 600.0  # seconds: `has(touch=True)` rewrites the metadata of blobs older than this
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def _missing(e: ClientError) -> bool:
    return str(e.response.get("Error", {}).get("Code")) in _MISSING


class S3BlobStore:
    def __init__(self, bucket: str, prefix: str = "", region: str | None = None,
                 endpoint_url: str | None = None, *, max_concurrency: int = 8,
                 multipart_threshold: int = 8 * MiB, multipart_chunksize: int = 8 * MiB):
        self.bucket = bucket
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.client = boto3.session.Session().client(
            "s3",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(max_pool_connections=max(32, 4 * max_concurrency),
                          retries={"max_attempts": 5, "mode": "standard"}),
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    def _blob(self, h: str) -> str:
        return f"{self._base}blobs/{check_hash(h)}"

    def _manifest(self, digest: str) -> str:
        return f"{self._base}manifests/{check_hash(digest)}.json"

    def _call(self, what: str, fn: Callable, **kw):
        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            if _missing(e):
                raise
            raise DstackError(f"S3 store s3://{self.bucket}/{self.prefix}: {what} failed: {e}") from e

    def _head(self, key: str) -> dict | None:
        try:
            return self._call("HEAD", self.client.head_object, Key=key)
        except ClientError:  # only "missing" gets here
            return None

    def has(self, h: str, *, touch: bool = False) -> bool:
        key = self._blob(h)
        head = self._head(key)
        if head is None:
            return False
        if touch and time.time() - head["LastModified"].timestamp() > TOUCH_AFTER:
            # a copy onto itself renews LastModified, which gc's grace period goes by
            self.client.copy(
                {"Bucket": self.bucket, "Key": key}, self.bucket, key,
                ExtraArgs={"MetadataDirective": "REPLACE", "Metadata": {"touched": str(int(time.time()))}},
                Config=self.transfer,
            )
        return True

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        key = self._blob(h)
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc):  # by name, so that parts are read in parallel; same open file
            self.client.upload_file(proc, self.bucket, key, Config=self.transfer)
        else:
            with os.fdopen(os.dup(fd), "rb") as f:
                self.client.upload_fileobj(f, self.bucket, key, Config=self.transfer)
        if check is not None:
            try:
                check()
            except BaseException:
                self.client.delete_object(Bucket=self.bucket, Key=key)
                raise

    def put_bytes(self, data: bytes, h: str) -> None:
        if hash_bytes(data) != check_hash(h):
            raise IntegrityError(f"data given as blob {h} has another hash")
        self._call("PUT", self.client.put_object, Key=self._blob(h), Body=data)

    def fetch(self, h: str, dest: Path) -> None:
        key = self._blob(h)

        def download(out: int) -> str:
            with os.fdopen(os.dup(out), "wb") as f:
                try:
                    self.client.download_fileobj(self.bucket, key, f, Config=self.transfer)
                except ClientError as e:
                    if _missing(e):
                        raise NotFound(f"blob {h} is not in the store {self!r}") from None
                    raise
            return hash_fd(out, os.fstat(out).st_size)

        write_verified(Path(dest), h, download)

    def local_path(self, h: str) -> Path | None:
        return None

    def put_manifest(self, m: Manifest) -> str:
        digest = m.digest()
        self._call("PUT", self.client.put_object, Key=self._manifest(digest), Body=m.canonical_json(),
                   ContentType="application/json")
        return digest

    def get_manifest(self, digest: str) -> Manifest:
        try:
            obj = self._call("GET", self.client.get_object, Key=self._manifest(digest))
        except ClientError:
            raise NotFound(f"artifact manifest {digest} is not in the store {self!r}") from None
        return parse_manifest(obj["Body"].read(), digest)

    def has_manifest(self, digest: str) -> bool:
        return self._head(self._manifest(digest)) is not None

    def _list(self, sub: str) -> Iterator[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._base + sub)
        for page in pages:
            yield from page.get("Contents", [])

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for obj in self._list("blobs/"):
            yield BlobInfo(obj["Key"].rsplit("/", 1)[1], obj["LastModified"].timestamp(), obj["Size"])

    def delete_blobs(self, hashes: Iterable[str], *, older_than: float | None = None) -> list[str]:
        hashes = list(hashes)
        if older_than is not None:  # look again just before deleting: a writer may have touched it
            def old(h: str) -> bool:
                head = self._head(self._blob(h))
                return head is not None and head["LastModified"].timestamp() < older_than

            with ThreadPoolExecutor(16) as pool:
                hashes = [h for h, ok in zip(hashes, pool.map(old, hashes), strict=True) if ok]
        for i in range(0, len(hashes), 1000):
            batch = hashes[i:i + 1000]
            resp = self._call("DELETE", self.client.delete_objects,
                              Delete={"Objects": [{"Key": self._blob(h)} for h in batch], "Quiet": True})
            if resp.get("Errors"):
                raise DstackError(f"S3 store {self!r}: could not delete {len(resp['Errors'])} blobs: "
                                  f"{resp['Errors'][0]}")
        return hashes

    def iter_manifests(self) -> Iterator[BlobInfo]:
        for obj in self._list("manifests/"):
            name = obj["Key"].rsplit("/", 1)[1]
            if name.endswith(".json"):
                yield BlobInfo(name[: -len(".json")], obj["LastModified"].timestamp(), obj["Size"])

    def delete_manifest(self, digest: str) -> None:
        self._call("DELETE", self.client.delete_object, Key=self._manifest(digest))

    def iter_stale_uploads(self, older_than: float) -> Iterator[BlobInfo]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self._base)
        for page in pages:
            for up in page.get("Uploads", []):
                if up["Initiated"].timestamp() >= older_than:
                    continue
                size = 0
                try:
                    for parts in self.client.get_paginator("list_parts").paginate(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]):
                        size += sum(p["Size"] for p in parts.get("Parts", []))
                except ClientError as e:
                    if not _missing(e):
                        raise
                    continue
                yield BlobInfo(f"{up['UploadId']} {up['Key']}", up["Initiated"].timestamp(), size)

    def delete_stale_upload(self, name: str) -> None:
        upload_id, _, key = name.partition(" ")
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if not _missing(e):
                raise

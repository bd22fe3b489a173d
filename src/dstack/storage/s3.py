"""The store in an S3 bucket (AWS, or any S3-compatible server through `endpoint_url`).

Layout under `prefix`: blobs/<h>, manifests/<digest>.json. A PUT (or a completed multipart upload)
is atomic, so a reader sees a whole object or none; uploads that never complete are aborted by gc.
Large files go up and down in parts, several at once (boto3's transfer manager); every download is
verified against its hash before it is renamed into place. Credentials: boto3's usual chain
(environment, ~/.aws, instance profile)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dstack.core.errors import DstackError, NotFound
from dstack.core.manifest import Manifest
from dstack.storage.blobstore import TOUCH_AFTER, BlobInfo, ingest_fd, parse_manifest, write_verified
from dstack.storage.hashing import IntegrityError, check_hash, hash_bytes, hash_fd

MiB = 1 << 20
PRESIGN_EXPIRES = 3600  # seconds a presigned URL works
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


class _Missing(Exception):
    pass


class S3BlobStore:
    def __init__(self, bucket: str, prefix: str = "", region: str | None = None,
                 endpoint_url: str | None = None, *, max_concurrency: int = 8,
                 multipart_threshold: int = 8 * MiB, multipart_chunksize: int = 8 * MiB):
        self.bucket = bucket
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.concurrency = 16  # requests in flight for many small objects (each waits on the network)
        self.client = boto3.session.Session().client(
            "s3",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(max_pool_connections=max(32, 4 * max_concurrency), signature_version="s3v4",
                          retries={"max_attempts": 5, "mode": "standard"}),  # s3v4: presigned URLs for every region
        )
        self.transfer = TransferConfig(  # parts of 8 MiB, 8 at once (boto3 grows parts past 10,000)
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

    @contextmanager
    def _s3(self, what: str):
        """S3's errors as ours: _Missing for absent keys, DstackError for everything else."""
        try:
            yield
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in _MISSING:
                raise _Missing() from None
            raise DstackError(f"artifact store s3://{self.bucket}/{self.prefix}: {what} failed: {e}") from e
        except (BotoCoreError, Boto3Error) as e:
            raise DstackError(f"artifact store s3://{self.bucket}/{self.prefix}: {what} failed: {e}") from e

    def _head(self, key: str) -> dict | None:
        try:
            with self._s3(f"HEAD {key}"):
                return self.client.head_object(Bucket=self.bucket, Key=key)
        except _Missing:
            return None

    def has(self, h: str, *, touch: bool = False) -> bool:
        key = self._blob(h)
        head = self._head(key)
        if head is None:
            return False
        if touch and time.time() - head["LastModified"].timestamp() > TOUCH_AFTER:
            # a copy onto itself renews LastModified, which gc's grace period goes by
            with self._s3(f"touch {key}"):
                self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, key, Config=self.transfer,
                                 ExtraArgs={"MetadataDirective": "REPLACE",
                                            "Metadata": {"touched": str(int(time.time()))}})
        return True

    def ingest(self, fd: int, size: int, check: Callable[[], None] | None = None) -> str:
        return ingest_fd(self, fd, size, check)  # hash first: an upload costs more than a read

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        key = self._blob(h)
        proc = f"/proc/self/fd/{fd}"
        with self._s3(f"upload of {key}"):
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

    def put_bytes(self, data: bytes, h: str, *, trusted: bool = False) -> None:
        if not trusted and hash_bytes(data) != check_hash(h):
            raise IntegrityError(f"data given as blob {h} has another hash")
        with self._s3(f"upload of blob {h}"):
            self.client.put_object(Bucket=self.bucket, Key=self._blob(h), Body=data)

    def fetch(self, h: str, dest: Path) -> None:
        key = self._blob(h)

        def download(out: int) -> str:
            with os.fdopen(os.dup(out), "wb") as f:
                try:
                    with self._s3(f"download of {key}"):
                        self.client.download_fileobj(self.bucket, key, f, Config=self.transfer)
                except _Missing:
                    raise NotFound(f"blob {h} is not in the store {self!r}") from None
            return hash_fd(out, os.fstat(out).st_size)

        write_verified(Path(dest), h, download)

    def local_path(self, h: str) -> Path | None:
        return None

    # ---- presigned URLs: what a runner may do with one blob, without the store's credentials ----

    def presign_get(self, h: str, expires: int = PRESIGN_EXPIRES) -> str:
        """A URL that GETs blob `h` (Range too) for `expires` seconds."""
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._blob(h)},
                                                  ExpiresIn=expires)

    def presign_put(self, h: str, size: int, expires: int = PRESIGN_EXPIRES) -> str:
        """A URL that PUTs blob `h` (exactly `size` bytes) in one request."""
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._blob(h), "ContentLength": size},
            ExpiresIn=expires)

    def start_parts(self, h: str) -> str:
        """The id of a multipart upload of blob `h` (resumed when one is under way): parts go up by
        presign_part's URLs, then finish_parts publishes the blob."""
        key = self._blob(h)
        with self._s3(f"listing of the uploads of {key}"):
            ups = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key).get("Uploads", [])
        mine = sorted((u for u in ups if u["Key"] == key), key=lambda u: u["Initiated"])
        if mine:
            return mine[-1]["UploadId"]
        with self._s3(f"start of the upload of {key}"):
            return self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def uploaded_parts(self, h: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """The parts of an upload that S3 has: number -> (ETag, size)."""
        parts: dict[int, tuple[str, int]] = {}
        try:
            with self._s3("listing of parts"):
                for page in self.client.get_paginator("list_parts").paginate(
                        Bucket=self.bucket, Key=self._blob(h), UploadId=upload_id):
                    for p in page.get("Parts", []):
                        parts[p["PartNumber"]] = (p["ETag"], p["Size"])
        except _Missing:
            raise NotFound(f"no upload {upload_id} of blob {h}") from None
        return parts

    def presign_part(self, h: str, upload_id: str, number: int, expires: int = PRESIGN_EXPIRES) -> str:
        return self.client.generate_presigned_url(
            "upload_part", Params={"Bucket": self.bucket, "Key": self._blob(h), "UploadId": upload_id,
                                   "PartNumber": number}, ExpiresIn=expires)

    def finish_parts(self, h: str, upload_id: str, size: int) -> None:
        """Publish blob `h` from the parts S3 has of the upload (all of them, `size` bytes in all)."""
        parts = self.uploaded_parts(h, upload_id)
        got = sum(n for _etag, n in parts.values())
        if got != size or sorted(parts) != list(range(1, len(parts) + 1)):
            raise IntegrityError(f"the upload of blob {h} has {len(parts)} parts and {got} bytes, not {size}")
        try:
            with self._s3(f"completion of the upload of blob {h}"):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._blob(h), UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n][0]} for n in sorted(parts)]})
        except _Missing:
            raise NotFound(f"no upload {upload_id} of blob {h}") from None

    def blob_size(self, h: str) -> int | None:
        head = self._head(self._blob(h))
        return None if head is None else head["ContentLength"]

    def put_manifest(self, m: Manifest) -> str:
        digest = m.digest()
        with self._s3(f"upload of manifest {digest}"):  # again if it exists: renews its time for gc
            self.client.put_object(Bucket=self.bucket, Key=self._manifest(digest), Body=m.canonical_json(),
                                   ContentType="application/json")
        return digest

    def get_manifest(self, digest: str) -> Manifest:
        try:
            with self._s3(f"download of manifest {digest}"):
                data = self.client.get_object(Bucket=self.bucket, Key=self._manifest(digest))["Body"].read()
        except _Missing:
            raise NotFound(f"artifact manifest {digest} is not in the store {self!r}") from None
        return parse_manifest(data, digest)

    def has_manifest(self, digest: str) -> bool:
        return self._head(self._manifest(digest)) is not None

    def _list(self, sub: str) -> Iterator[tuple[str, float, int]]:
        with self._s3(f"listing of {sub}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                         Prefix=self._base + sub)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"].rsplit("/", 1)[1], obj["LastModified"].timestamp(), obj["Size"]

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for name, mtime, size in self._list("blobs/"):
            yield BlobInfo(name, mtime, size)

    def delete_blobs(self, hashes: Iterable[str], *, older_than: float | None = None) -> list[str]:
        hashes = list(hashes)
        if older_than is not None:
            # look again just before deleting: a save may have touched it since it was listed
            def old(h: str) -> bool:
                head = self._head(self._blob(h))
                return head is not None and head["LastModified"].timestamp() < older_than

            with ThreadPoolExecutor(self.concurrency) as pool:
                hashes = [h for h, ok in zip(hashes, pool.map(old, hashes), strict=True) if ok]
        for i in range(0, len(hashes), 1000):
            batch = hashes[i:i + 1000]
            with self._s3("delete of blobs"):
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self._blob(h)} for h in batch], "Quiet": True})
            if resp.get("Errors"):
                raise DstackError(f"artifact store {self!r}: could not delete {len(resp['Errors'])} blobs: "
                                  f"{resp['Errors'][0]}")
        return hashes

    def iter_manifests(self) -> Iterator[BlobInfo]:
        for name, mtime, size in self._list("manifests/"):
            if name.endswith(".json"):
                yield BlobInfo(name[: -len(".json")], mtime, size)

    def delete_manifest(self, digest: str) -> None:
        with self._s3(f"delete of manifest {digest}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._manifest(digest))

    def iter_stale_uploads(self, older_than: float) -> Iterator[BlobInfo]:
        """Multipart uploads under the prefix that never completed (a save killed halfway)."""
        with self._s3("listing of multipart uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                Prefix=self._base)
            uploads = [up for page in pages for up in page.get("Uploads", [])
                       if up["Initiated"].timestamp() < older_than]
        for up in uploads:
            size = 0
            try:
                with self._s3("listing of parts"):
                    for parts in self.client.get_paginator("list_parts").paginate(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]):
                        size += sum(p["Size"] for p in parts.get("Parts", []))
            except _Missing:
                continue  # completed or aborted meanwhile
            yield BlobInfo(f"{up['UploadId']} {up['Key']}", up["Initiated"].timestamp(), size)

    def delete_stale_upload(self, name: str) -> None:
        upload_id, _, key = name.partition(" ")
        try:
            with self._s3(f"abort of the upload of {key}"):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except _Missing:
            pass

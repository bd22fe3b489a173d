"""The runner's artifact transfers through the server (`/api/runners/{name}/jobs/{job_id}/...`): what a runner
asks and what the server answers. Blobs are named by their BLAKE3 hash, manifests by their digest."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dstack.core.base import Body, Model

Hash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MAX_BLOBS = 10_000  # blobs named in one request
MAX_BLOB_SIZE = 5 * 1024**4  # bytes: S3's largest object


class StoreAccess(Model):
    """GET /api/runners/store: how a runner reaches the artifact store. `path` (a local folder store) is for a
    runner on the server's machine (`machine_id`, /etc/machine-id, tells which) that can open it: it saves and
    mounts by hard link there. Every other runner goes through the transfer API; `presigned`: its blobs come
    and go by presigned URLs of the store's S3 bucket (the server hands them out)."""

    type: Literal["local", "s3"]
    path: str | None = None
    machine_id: str | None = None
    presigned: bool = False


class BlobSize(Body):
    hash: Hash
    size: int | None = Field(None, ge=0, le=MAX_BLOB_SIZE)  # None: only whether the store has it


class UploadRequest(Body):
    """POST .../uploads: which of these blobs the store lacks, and how to send each."""

    blobs: list[BlobSize] = Field(max_length=MAX_BLOBS)


class Part(Model):
    number: int
    url: str
    size: int


class UploadPlan(Model):
    """How to send one blob. `stored`: the store has it (nothing to send). Else `url` (a presigned PUT of the
    whole blob), or `parts` (presigned PUTs of the parts of a multipart upload `upload_id`; `done`: the parts the
    store has already, then POST .../blobs/{hash}/complete), or neither: PUT .../blobs/{hash}?offset=`offset`
    &size=SIZE to the server, `offset` being the bytes it holds of an upload that was cut."""

    hash: str
    stored: bool = False
    offset: int = 0
    url: str | None = None
    upload_id: str | None = None
    part_size: int = 0  # part N holds bytes [(N - 1) * part_size, N * part_size)
    parts: list[Part] = []
    done: list[int] = []


class UploadPlans(Model):
    blobs: list[UploadPlan]


class CompleteUpload(Body):
    upload_id: str = Field(max_length=1024)
    size: int = Field(ge=0, le=MAX_BLOB_SIZE)


class DownloadRequest(Body):
    """POST .../downloads: presigned URLs of these blobs (of the job's dependencies)."""

    hashes: list[Hash] = Field(max_length=MAX_BLOBS)


class DownloadUrls(Model):
    urls: dict[str, str] = {}  # empty for a store without presigned URLs: GET .../blobs/{hash} from the server

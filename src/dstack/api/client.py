"""The Python client of the dstack server's HTTP API (the CLI uses nothing else)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote

from dstack.api.http import HttpClient, Response, TransportError
from dstack.core.errors import DstackError, error_from_dict
from dstack.core.status import JobStatus

if TYPE_CHECKING:
    from dstack.core.models import RunnerInfo, Tag


class LogChunk(NamedTuple):
    data: bytes
    next_offset: int
    status: JobStatus
    more: bool  # more output follows this chunk
    # once the job has finished:
    exit_code: int | None = None
    reason: str | None = None
    seconds: float | None = None  # from its start to its end
    runner: str | None = None  # once it has one
    host_user: str | None = None  # whom a job without an image runs as on that runner


IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE")  # sent again after a restart: twice is as once


class Unreachable(DstackError):
    """The server did not answer (it is down, restarting, or the network is cut)."""


class Client:
    def __init__(self, url: str, token: str, timeout: float = 60.0,
                 unreachable_hint: str = "is it running? `dstack server` starts one in the foreground",
                 restart: Callable[[], tuple[str, str]] | None = None):
        """`unreachable_hint`: what to do when the server cannot be reached. `restart()`: for the local server,
        starts it again when it is gone (it comes back at the same address) and gives its url and token; a
        request that finds the server gone is then sent once more."""
        self.timeout = timeout
        self._connect(url, token)
        self.unreachable_hint = unreachable_hint
        self.restart = restart

    def _connect(self, url: str, token: str) -> None:
        if getattr(self, "http", None) is not None:
            self.http.close()
        self.url = url.rstrip("/")
        self.http = HttpClient(self.url, headers={"Authorization": f"Bearer {token}"}, timeout=self.timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Response:
        try:
            r = self.http.request(method, path, **kw)
        except TransportError as e:
            if self.restart is None:
                raise Unreachable(f"cannot reach the dstack server at {self.url}: {e}",
                                  hint=self.unreachable_hint) from None
            self._connect(*self.restart())  # the local server died (killed, crashed): it comes back
            if not (e.refused or method in IDEMPOTENT):  # it may have taken the request before it died
                raise Unreachable(f"the dstack server at {self.url} died while it answered {method} {path}; "
                                  "it has been started again", hint="`dstack status` shows whether it was taken "
                                  "before; run the command again if not") from None
            try:
                r = self.http.request(method, path, **kw)
            except TransportError as e2:
                raise Unreachable(f"cannot reach the dstack server at {self.url}: {e2}",
                                  hint=self.unreachable_hint) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                raise DstackError(f"the server answered {r.status_code}: {r.text[:300]}") from None
            raise error_from_dict(err)
        return r

    def healthz(self) -> dict:
        return self._call("GET", "/api/healthz", timeout=5).json()

    # runs: as the API gives them (JSON objects of `Run` and `Job`); `Run.model_validate` makes models of them.
    # `dstack run` follows a run on these alone, and so loads no models.
    def submit(self, request: dict) -> dict:
        """POST /api/runs with the fields of a `RunRequest`: the server resolves and queues the workflow."""
        return self._call("POST", "/api/runs", json=request).json()

    def artifact_folders(self, files: dict[str, str], workflow: str | None) -> dict:
        """POST /api/artifact-folders: the project's folders that hold outputs (`ArtifactFolders`), which code
        capture leaves out; none from a server older than this call."""
        try:
            return self._call("POST", "/api/artifact-folders", json={"files": files, "workflow": workflow}).json()
        except DstackError as e:
            if type(e) is DstackError and e.message.startswith("the server answered 404:"):  # no such path there
                return {"folders": [], "saved": []}
            raise

    def runs(self, repo_id: str | None, limit: int | None = None, workflow: str | None = None) -> list[dict]:
        """Runs as the API gives them (JSON objects of `Run`, without job specs): a listing is printed,
        not computed on, and skipping the models keeps `dstack status` quick."""
        return self.runs_and_total(repo_id, limit, workflow)[0]

    def runs_and_total(self, repo_id: str | None, limit: int | None = None,
                       workflow: str | None = None) -> tuple[list[dict], int | None]:
        """`runs`, and how many there are in all (None from a server that does not say)."""
        params = {k: v for k, v in {"repo_id": repo_id, "limit": limit, "workflow": workflow}.items() if v}
        r = self._call("GET", "/api/runs", params=params)
        total = r.headers.get("x-total-count")
        return r.json(), int(total) if total and total.isdigit() else None

    def run(self, repo_id: str | None, name: str) -> dict:
        params = {"repo_id": repo_id} if repo_id else {}
        return self._call("GET", f"/api/runs/{name}", params=params).json()

    def reproduce(self, repo_id: str | None, name: str) -> dict:
        params = {"repo_id": repo_id} if repo_id else {}
        return self._call("POST", f"/api/runs/{name}/reproduce", params=params).json()

    def stop(self, repo_id: str | None, ref: str, abort: bool = False) -> dict:
        params = {"abort": abort, **({"repo_id": repo_id} if repo_id else {})}
        return self._call("POST", f"/api/runs/{ref}/stop", params=params).json()

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/api/jobs/{job_id}").json()

    def logs(self, job_id: str, offset: int = 0, wait: float = 0, status: str | None = None) -> LogChunk:
        """Output from `offset`; with `wait`, waits up to that many seconds for some, or for the job's end, or
        (given `status`, the one seen last) for its status to change."""
        params = {"offset": offset, "wait": wait, **({"status": status} if status else {})}
        r = self._call("GET", f"/api/jobs/{job_id}/logs", params=params, timeout=wait + 30)
        h = r.headers
        return LogChunk(r.content, int(h["x-next-offset"]), JobStatus(h["x-job-status"]), "x-more-logs" in h,
                        int(h["x-job-exit-code"]) if "x-job-exit-code" in h else None,
                        unquote(h["x-job-reason"]) if "x-job-reason" in h else None,
                        float(h["x-job-seconds"]) if "x-job-seconds" in h else None,
                        h.get("x-job-runner"), unquote(h["x-job-host-user"]) if "x-job-host-user" in h else None)

    # tags
    def tag(self, repo_id: str, run_name: str, tag: str) -> tuple[Tag, str | None]:
        from dstack.core.models import Tag

        d = self._call("POST", "/api/tags", json={"repo_id": repo_id, "run_name": run_name, "tag": tag}).json()
        return Tag.model_validate(d["tag"]), d["moved_from"]

    def untag(self, repo_id: str, ref: str) -> list[Tag]:
        from dstack.core.models import Tag

        r = self._call("DELETE", "/api/tags", params={"repo_id": repo_id, "ref": ref})
        return [Tag.model_validate(x) for x in r.json()]

    def tags(self, repo_id: str) -> list[Tag]:
        from dstack.core.models import Tag

        return [Tag.model_validate(x) for x in self._call("GET", "/api/tags", params={"repo_id": repo_id}).json()]

    # runners
    def runners(self, include_gone: bool = False) -> list[RunnerInfo]:
        from dstack.core.models import RunnerInfo

        r = self._call("GET", "/api/runners", params={"all": include_gone})
        return [RunnerInfo.model_validate(x) for x in r.json()]

    def add_runner(self, name: str | None, labels: dict[str, str]) -> dict:
        """A new runner identity: {name, token, labels}; the token is in this answer only."""
        return self._call("POST", "/api/runners/tokens", json={"name": name, "labels": labels}).json()

    def remove_runner(self, name: str, force: bool = False) -> dict:
        """The runner as it is now (draining), or {} when it is gone."""
        return self._call("POST", f"/api/runners/{name}/remove", params={"force": force}).json()

    # artifacts
    # backends, limits, instances: JSON as the API gives it (core/backends.py); never a credential in an answer
    def backends(self) -> list[dict]:
        return self._call("GET", "/api/backends").json()

    def backend_kinds(self) -> list[dict]:
        return self._call("GET", "/api/backend-kinds").json()

    def add_backend(self, name: str, kind: str, settings: dict) -> dict:
        return self._call("POST", "/api/backends", json={"name": name, "kind": kind, "settings": settings}).json()

    def test_backend(self, name: str, kind: str | None = None, settings: dict | None = None) -> dict:
        if kind is None:
            return self._call("POST", f"/api/backends/{name}/test").json()
        return self._call("POST", "/api/backends/test",
                          json={"name": name, "kind": kind, "settings": settings or {}}).json()

    def remove_backend(self, name: str) -> dict:
        return self._call("DELETE", f"/api/backends/{name}").json()

    def limits(self) -> dict:
        return self._call("GET", "/api/limits").json()

    def set_limits(self, backend: str, changes: dict) -> dict:
        return self._call("PATCH", f"/api/limits/{backend}", json=changes).json()

    def remove_limits(self, backend: str) -> dict:
        return self._call("DELETE", f"/api/limits/{backend}").json()

    def instances(self, include_gone: bool = False) -> list[dict]:
        return self._call("GET", "/api/instances", params={"all": include_gone}).json()

    def artifacts(self, repo_id: str | None, ref: str) -> list[dict]:
        params = {"repo_id": repo_id} if repo_id else {}
        return self._call("GET", f"/api/runs/{ref}/artifacts", params=params).json()

    def manifest(self, digest: str):
        from dstack.core.manifest import Manifest

        return Manifest.parse(self._call("GET", f"/api/manifests/{digest}").content)

    def download_blob(self, digest: str, out, offset: int = 0, on_bytes=None) -> None:
        try:
            status = self.http.download(f"/api/blobs/{digest}", out, offset, on_bytes)
        except TransportError as e:
            raise DstackError(f"download of blob {digest[:16]} broke: {e}", hint="run the same command again: "
                              "it resumes where it stopped") from None
        if status >= 300:
            raise DstackError(f"the server answered {status} for blob {digest[:16]}")

    def prune(self, repo_id: str, dry_run: bool) -> dict:
        return self._call("POST", "/api/prune", params={"repo_id": repo_id, "dry_run": dry_run}).json()

    # code
    def upload_code(self, digest: str, data: bytes) -> None:
        self._call("PUT", f"/api/code/{digest}", content=data)

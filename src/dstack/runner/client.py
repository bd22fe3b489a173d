"""The runner's HTTP client to its server."""

from __future__ import annotations

import httpx

from dstack.core.errors import DstackError, error_from_dict
from dstack.core.models import HeartbeatReply, JobSpec, JobStatus, JobUpdate, RunnerInfo, RunnerRegistration


class ServerError(DstackError):
    """The server failed to answer a request (5xx)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServerTrouble(ServerError):
    """The server cannot take a request now (502, 503, 504, 507: it is stopping, restarting, behind a proxy
    that lost it, its disk is full): the same request goes through later."""


TEMPORARY = (502, 503, 504, 507)
RETRYABLE = (httpx.TransportError, ServerTrouble)  # errors after which a report is sent again, for as long as needed


def raise_for(r: httpx.Response) -> httpx.Response:
    """`r`, unless the server refused or failed the request: then its error, as ours (ServerTrouble: try again)."""
    if r.status_code >= 400:
        try:
            error = error_from_dict(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            error = DstackError(f"server answered {r.status_code}: {r.text[:200]}")
        if r.status_code in TEMPORARY:
            raise ServerTrouble(error.message, r.status_code)
        if r.status_code >= 500:
            raise ServerError(error.message, r.status_code)
        raise error
    return r


class ServerClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout)

    def _check(self, r: httpx.Response) -> httpx.Response:
        return raise_for(r)

    def register(self, reg: RunnerRegistration) -> RunnerInfo:
        return RunnerInfo.model_validate(self._check(self.http.post("/api/runners/register",
                                                                    json=reg.model_dump(mode="json"))).json())

    def heartbeat(self, name: str, job_ids: list[str], last_taken: str | None = None) -> HeartbeatReply:
        """`job_ids`: the jobs it runs (`job_id` too, the first: for a server before 0.4)."""
        r = self._check(self.http.post(f"/api/runners/{name}/heartbeat", json={
            "job_ids": job_ids, "job_id": job_ids[0] if job_ids else None, "last_taken": last_taken}, timeout=5))
        return HeartbeatReply.model_validate(r.json())

    def take(self, name: str, wait: float, port: int | None = None) -> JobSpec | None:
        """A job for this runner, waiting up to `wait` s for one. `port`: one free here now, for the master of a
        multi-node run placed here (MASTER_JOB_PORT)."""
        params = {"wait": wait} if port is None else {"wait": wait, "port": port}
        r = self._check(self.http.post(f"/api/runners/{name}/take", params=params, timeout=wait + 10))
        return None if r.status_code == 204 else JobSpec.model_validate(r.json())

    def update(self, name: str, job_id: str, upd: JobUpdate) -> JobStatus | None:
        """Report the job's status; the status the server has for it now (a finished job's first word stands)."""
        r = self._check(self.http.post(f"/api/runners/{name}/jobs/{job_id}/status", json=upd.model_dump(mode="json")))
        try:
            return JobStatus(r.json()["status"])
        except (ValueError, KeyError, TypeError):
            return None

    def logs(self, name: str, job_id: str, offset: int, data: bytes) -> None:
        """Output of the job, starting at `offset` of all its output (a batch sent twice is appended once)."""
        self._check(self.http.post(f"/api/runners/{name}/jobs/{job_id}/logs", params={"offset": offset},
                                   content=data))

    def interrupted(self, name: str, action: str, when: str | None) -> list[str]:
        """This machine is a spot one being taken back: the jobs the server ends or requeues."""
        r = self._check(self.http.post(f"/api/runners/{name}/interrupted", json={"action": action, "time": when},
                                       timeout=10))
        return r.json().get("jobs", [])

    def deregister(self, name: str) -> None:
        self._check(self.http.post(f"/api/runners/{name}/deregister", timeout=5))

    def version(self) -> tuple[int, ...]:
        """The server's version, e.g. (0, 3, 0); (0,) when it does not say."""
        try:
            text = self._check(self.http.get("/api/healthz", timeout=5)).json().get("version", "0")
            return tuple(int(x) for x in text.split(".")[:3] if x.isdigit()) or (0,)
        except (ValueError, DstackError):  # e.g. a proxy that does not pass /api/healthz: an old server
            return (0,)

    def store_config(self) -> dict:
        return self._check(self.http.get("/api/runners/store")).json()

    def code(self, digest: str) -> bytes:
        return self._check(self.http.get(f"/api/code/{digest}")).content

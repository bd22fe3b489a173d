"""Backends create runners on demand. Capabilities are types: the autoscaler asks isinstance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dstack.core.resources import RunnerResources


@dataclass
class Bootstrap:
    """What a new runner needs to find its server."""

    server_url: str
    token: str
    runner_name: str
    idle_timeout: float


@dataclass
class Instance:
    id: str
    runner_name: str
    started_at: float


class Backend(Protocol):
    name: str
    max_runners: int  # the limit: runners of this backend alive at once

    def offers(self) -> list[RunnerResources]:
        """The kinds of runner this backend can create."""

    def create(self, offer: RunnerResources, bootstrap: Bootstrap) -> Instance: ...

    def terminate(self, instance_id: str) -> None: ...

    def list(self) -> list[Instance]: ...

    def release_jobs(self, job_ids: list[str]) -> None:
        """The runners of these jobs were lost: make sure nothing of the jobs runs on."""

    def describe_failure(self, runner_name: str) -> str:
        """Why the runner it started ended before it registered, as far as the backend can tell (where to look)."""

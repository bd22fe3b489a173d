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


@dataclass(frozen=True)
class Offer:
    """A kind of runner that a backend can create: what it gives jobs, and what it costs."""

    backend: str
    resources: RunnerResources
    price: float = 0.0  # USD an hour
    instance_type: str | None = None
    region: str | None = None
    spot: bool = False

    def describe(self) -> str:
        """`aws g5.xlarge, us-east-1, spot, $0.45/h`: as a run shows what is provisioned for it."""
        head = " ".join(p for p in (self.backend, self.instance_type) if p)
        return ", ".join([head, *([self.region] if self.region else []), *(["spot"] if self.spot else []),
                          f"${self.price:.2f}/h"])


@dataclass
class Instance:
    id: str
    runner_name: str
    started_at: float


class Backend(Protocol):
    name: str
    max_runners: int  # the limit: runners of this backend alive at once

    def offers(self) -> list[Offer]:
        """The kinds of runner this backend can create, with their prices."""

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance: ...

    def terminate(self, instance_id: str) -> None: ...

    def list(self) -> list[Instance]: ...

    def release_jobs(self, job_ids: list[str]) -> None:
        """The runners of these jobs were lost: make sure nothing of the jobs runs on."""

    def describe_failure(self, runner_name: str) -> str:
        """Why the runner it started ended before it registered, as far as the backend can tell (where to look)."""

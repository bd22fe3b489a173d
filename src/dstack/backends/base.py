"""Backends create runners on demand. One interface (`Backend`); what a backend can do beyond it is a type it
derives from (`Spot`, `Gpus`, `MultiNode`), which the autoscaler asks with isinstance. A backend that
`dstack backends add` configures (`Configurable`) is built from its settings, credentials included; the server
keeps those encrypted and hands them only to the backend's constructor.

Rules every backend keeps (the autoscaler relies on them):
- `offers()` is cheap (no network call per pass: a catalogue read once, kept in memory), and lists every kind of
  runner it can create with its hourly price; the server filters them by the user's limits.
- `create()` returns once the backend has accepted the request (the runner registers later, by itself). A
  capacity or quota refusal is a `CapacityError` (its message is the provider's reason, shown to the user); the
  autoscaler then tries the next offer. Everything it creates carries tags (labels) naming the server
  (`Bootstrap.server_id`) and the runner, so that `list()` finds it again after a server restart.
- `terminate()` is idempotent: an instance that is gone already is terminated. It returns True once the backend
  confirms the instance is gone (or going: shutting down, terminated), False when it should be asked again.
- `list()` returns every instance that carries this server's tags and is not terminated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from dstack.core.resources import Requirements, RunnerResources


class BackendError(Exception):
    """A backend's settings or credentials do not work: the message says what and how to fix it (never a
    secret)."""


def validated_settings(model: type, name: str, settings: dict[str, Any]) -> Any:
    """`settings` as `model` (a pydantic model); a BackendError that names each wrong key and never its value
    (pydantic's own text quotes the input: a secret, maybe)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(settings)
    except ValidationError as e:
        what = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                         for err in e.errors(include_input=False, include_url=False))
        raise BackendError(f"the settings of backend '{name}' are not valid: {what}") from None


class CapacityError(BackendError):
    """This offer cannot be had now (no capacity, a quota, a spot price): try the next one. The message is the
    provider's reason, e.g. `InsufficientInstanceCapacity: We currently do not have sufficient g5.xlarge ...`."""


@dataclass
class Bootstrap:
    """What a new runner needs to find its server, and what the backend tags its instance with."""

    server_url: str
    token: str  # the runner's own token (never the admin's)
    runner_name: str
    idle_timeout: float  # seconds without a job before the runner exits (and its instance shuts down)
    server_id: str = ""  # the tag `dstack:server` on everything the backend creates for this server
    labels: dict[str, str] = field(default_factory=dict)
    interruptible: bool = False  # a spot machine: the runner starts with --interruptible
    requirements: Requirements | None = None  # the job's resources: what a scheduler is asked for (slurm)


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
                          *([f"${self.price:.2f}/h"] if self.price else [])])


@dataclass
class Instance:
    id: str
    runner_name: str
    started_at: float  # time.monotonic() of its creation (as near as the backend can tell)
    offer: Offer | None = None
    note: str | None = None  # what the backend says of it now, shown to jobs that wait for it ("Slurm: Resources")


class Backend(Protocol):
    name: str
    max_runners: int  # runners of this backend alive at once (the `local` backend's own limit)

    def offers(self) -> list[Offer]:
        """The kinds of runner this backend can create, with their prices."""

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance:
        """Ask for a runner of this offer; CapacityError: try another offer."""

    def terminate(self, instance_id: str) -> bool:
        """Idempotent; True once the backend confirms the instance is gone or going."""

    def list(self) -> list[Instance]:
        """The instances that carry this server's tags and are not terminated."""

    def release_jobs(self, job_ids: list[str]) -> None:
        """The runners of these jobs were lost: make sure nothing of the jobs runs on."""

    def describe_failure(self, runner_name: str) -> str:
        """Why the runner it started ended before it registered, as far as the backend can tell (where to look)."""


@runtime_checkable
class Configurable(Protocol):
    """A backend that `dstack backends add KIND` configures: built from its settings (the keys of `settings_model`,
    a pydantic model; those named in `secrets` are credentials: stored encrypted, never shown), and tested."""

    settings_model: ClassVar[type]
    secrets: ClassVar[tuple[str, ...]]

    def __init__(self, name: str, settings: dict[str, Any], *, server_id: str, home: Path) -> None: ...

    def test(self) -> str:
        """Check the settings against the provider (credentials, regions): what was found, e.g. `account
        123456789012, 3 regions`; BackendError when they do not work."""


class Spot:
    """Its offers include spot (interruptible) ones, for jobs that say `interruptible: true`; the runner reads
    the provider's interruption notice."""


class Gpus:
    """Its offers include machines with GPUs."""


class MultiNode:
    """It can create the runners of a multi-node run so that they reach each other."""


class Allocations(MultiNode):
    """It creates a multi-node run's runners in one request, which places them together (one Slurm allocation of
    k nodes): `create_group(offer, bootstraps) -> [Instance]`, all or none."""

    def create_group(self, offer: Offer, bootstraps: list[Bootstrap]) -> list[Instance]:
        raise NotImplementedError

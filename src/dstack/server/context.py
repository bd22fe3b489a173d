"""What every service needs: settings, the database, the artifact store, change signals, backends."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dstack.core.errors import ConfigError
from dstack.server.services.code import CodeBlobs
from dstack.storage.blobstore import BlobStore


def _env_number(name: str, default: float, least: float, kind=float) -> float:
    """A number from the environment, or a clear error saying which variable is wrong (not a traceback)."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return kind(default)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or value < least:
        what = "a whole number" if kind is int else "a number of seconds"
        raise ConfigError(f"{name}={text!r} is not {what} of at least {least:g}",
                          hint=f"e.g. {name}={default:g}, or unset it for that default")
    return value


@dataclass
class Settings:
    home: Path
    db_url: str
    token: str
    host: str = "127.0.0.1"
    port: int = 0
    # a runner that has not been heard from for this long is lost; its job fails
    runner_timeout: float = _env_number("DSTACK_RUNNER_TIMEOUT", 30, least=1)
    # local runners exit after this long without a job
    runner_idle_timeout: float = _env_number("DSTACK_RUNNER_IDLE_TIMEOUT", 300, least=0)
    # one runner serves this machine (it runs as many jobs at once as its CPUs, memory and GPUs allow); more would
    # each offer the whole machine
    max_local_runners: int = _env_number("DSTACK_MAX_LOCAL_RUNNERS", 1, least=0, kind=int)
    # while a job runs, prune keeps unreferenced stored data younger than this (it may be a save in flight)
    gc_grace: float = _env_number("DSTACK_GC_GRACE", 3600, least=0)
    # the artifact store: DSTACK_STORE_URL=s3://bucket/prefix?region=...&endpoint_url=..., else a folder
    store_url: str | None = os.environ.get("DSTACK_STORE_URL")

    @property
    def store_config(self) -> dict:
        if not self.store_url:
            return {"type": "local", "path": str(self.store_dir)}
        from urllib.parse import parse_qs, urlsplit

        u = urlsplit(self.store_url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"DSTACK_STORE_URL={self.store_url!r}: expected s3://BUCKET[/PREFIX][?region=R"
                             "&endpoint_url=URL]")
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        return {"type": "s3", "bucket": u.netloc, "prefix": u.path.strip("/"), "region": q.get("region"),
                "endpoint_url": q.get("endpoint_url")}

    # where runners on other machines reach this server (a cluster's login node, a proxy): DSTACK_SERVER_PUBLIC_URL
    public_url: str | None = os.environ.get("DSTACK_SERVER_PUBLIC_URL") or None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def runner_url(self) -> str:
        """The URL that the runners a backend starts are given: DSTACK_SERVER_PUBLIC_URL, else the bound address
        (for a wildcard one, this machine's name)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.host in ("0.0.0.0", "::", ""):
            import socket

            return f"http://{socket.getfqdn()}:{self.port}"
        return self.url

    @property
    def logs_dir(self) -> Path:
        return self.home / "server" / "logs"

    @property
    def store_dir(self) -> Path:
        return self.home / "storage"

    @property
    def runners_dir(self) -> Path:
        return self.home / "runners"


class Signals:
    """Wake-ups for long polls: runners waiting for jobs, CLIs waiting for logs or a status."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def notify(self, key: str) -> None:
        ev = self._events.pop(key, None)
        if ev:
            ev.set()

    def notify_all(self) -> None:
        events, self._events = self._events, defaultdict(asyncio.Event)
        for ev in events.values():
            ev.set()

    def listen(self, key: str) -> asyncio.Event:
        """The event the next `notify(key)` sets. Take it BEFORE looking at the state it guards, so that
        a change between the look and the wait is not missed."""
        return self._events[key]

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), max(timeout, 0))
            return True
        except TimeoutError:
            return False


@dataclass
class Context:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    store: BlobStore
    code: CodeBlobs
    signals: Signals = field(default_factory=Signals)
    backends: list = field(default_factory=list)
    stopping: bool = False  # the server is on its way out: long polls answer at once
    # jobs whose runner reported an end that the server could not write down (its disk is full): job id -> why
    unrecorded: dict[str, str] = field(default_factory=dict)
    # runner name -> when its last heartbeat came (monotonic), whether or not the database could record it
    heard: dict[str, float] = field(default_factory=dict)
    # runner name -> when a full heartbeat last found it idle with nothing to settle (monotonic): its next idle
    # heartbeats are answered from memory (services/runners.heartbeat); anything that may change that forgets it
    quiet: dict[str, float] = field(default_factory=dict)
    # the hash of a runner's token -> its runner's name, for the tokens seen (the database has them all)
    runner_tokens: dict[str, str] = field(default_factory=dict)
    # a runner's take counts what the jobs placed so far take of each runner: takes go one at a time (one server
    # process), so that two never count the same free GPU
    take_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # runners a backend started that have not registered yet: name -> backend; a backend whose runners exit
    # before they register: backend -> (failures in a row, when to try again, why), said as queued jobs' reason
    starting: dict[str, str] = field(default_factory=dict)
    start_failures: dict[str, tuple[int, float, str]] = field(default_factory=dict)
    # configured backends (services/backends.py): their credentials' seal, this server's id (the tag on what they
    # create), every backend's limits, why a configured one is not loaded, those removed whose instances still go
    sealer: Any = None
    server_id: str = ""
    limits: dict[str, Any] = field(default_factory=dict)
    backend_notes: dict[str, str] = field(default_factory=dict)
    removed_backends: set[str] = field(default_factory=set)
    # queued job id -> what the autoscaler did or could not do for it this pass (shown as the job's reason)
    waiting: dict[str, str] = field(default_factory=dict)
    # services/autoscaler.py: when each runner was asked for, the next teardown pass, each backend's last listing
    started_at: dict[str, float] = field(default_factory=dict)
    next_teardown: float = 0.0
    reconciled: dict[str, float] = field(default_factory=dict)
    offer_cache: dict[str, tuple] = field(default_factory=dict)  # backend -> its allowed offers, as last listed
    queued_specs: dict[str, Any] = field(default_factory=dict)  # queued job id -> its JobSpec, read once
    instance_notes: dict[tuple[str, str], str] = field(default_factory=dict)  # what backends say of instances
    uninstall_retries: dict[str, tuple[int, float]] = field(default_factory=dict)  # removed backend -> (n, when)

    def forget_quiet(self, runner_name: str) -> None:
        """The runner's next heartbeat reads the database: something about it changed (a job given, a drain)."""
        self.quiet.pop(runner_name, None)

    def stop(self) -> None:
        self.stopping = True
        self.signals.notify_all()

"""What every service needs: settings, the database, the artifact store, change signals, backends."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dstack.storage.local import LocalStore


@dataclass
class Settings:
    home: Path
    db_url: str
    token: str
    host: str = "127.0.0.1"
    port: int = 0
    # a runner that has not been heard from for this long is lost; its job fails
    runner_timeout: float = float(os.environ.get("DSTACK_RUNNER_TIMEOUT", "10"))
    # local runners exit after this long without a job
    runner_idle_timeout: float = float(os.environ.get("DSTACK_RUNNER_IDLE_TIMEOUT", "300"))
    max_local_runners: int = int(os.environ.get("DSTACK_MAX_LOCAL_RUNNERS", "4"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
    store: LocalStore
    signals: Signals = field(default_factory=Signals)
    backends: list = field(default_factory=list)

"""Job output to the server: batched, in order, promptly; never blocks the job."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("dstack.runner")
BATCH_DELAY = 0.1  # output gathers this long before it is sent; a job that ends sooner sends it with its end
MAX_BATCH = 256 * 1024


class LogShipper:
    def __init__(self, send: Callable[[bytes], None]):
        self._send = send
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False  # closed by drain(): the rest is the caller's to deliver
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify()

    def _take(self) -> bytes:
        data = bytes(self._buf[:MAX_BATCH])
        del self._buf[:MAX_BATCH]
        return data

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closed:
                    self._cond.wait()
                if self._draining or (not self._buf and self._closed):
                    return
            if not self._closed:
                self._closing.wait(BATCH_DELAY)  # gather a batch, unless the job just ended
            with self._cond:
                if self._draining:
                    return
                data = self._take()
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        for attempt in range(5):
            try:
                self._send(data)
                return
            except Exception as e:  # the server may be restarting; logs are worth a few retries
                if attempt == 4:
                    log.error("dropped %d bytes of logs: %s", len(data), e)
                threading.Event().wait(0.2 * (attempt + 1))

    def drain(self) -> bytes:
        """Stop shipping and return the output not delivered yet (at most MAX_BATCH bytes; anything before
        that is delivered here first), for the caller to send with the job's final status: one request
        instead of two, and the follower learns the end with the last bytes."""
        with self._cond:
            self._closed = self._draining = True
            self._closing.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()  # a batch in flight is delivered first
        with self._cond:
            rest = bytes(self._buf)
            self._buf.clear()
        while len(rest) > MAX_BATCH:
            self._deliver(rest[:MAX_BATCH])
            rest = rest[MAX_BATCH:]
        return rest

    def close(self) -> None:
        """Deliver everything written so far, then stop. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._closing.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

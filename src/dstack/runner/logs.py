"""Job output to the server: batched, in order, promptly, exactly once; never blocks the job.

Each batch is sent with its offset in the job's output, so that a batch sent again (the server took it, but
its answer was lost) is appended once. A batch the server cannot take (unreachable, restarting, its disk full)
is sent again, with back-off, until it is taken: output written meanwhile waits in memory, at most
MAX_BUFFER bytes; past that the oldest waiting output is replaced by a line that says how much was dropped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("dstack.runner")
BATCH_DELAY = 0.1  # output gathers this long before it is sent; a job that ends sooner sends it with its end
MAX_BATCH = 256 * 1024
MAX_BUFFER = 64 * 1024 * 1024  # output waiting for the server, at most
MAX_PAUSE = 5.0  # between two tries to send a batch


class LogShipper:
    def __init__(self, send: Callable[[int, bytes], None], retryable: tuple[type[BaseException], ...] = (Exception,),
                 give_up: Callable[[], bool] = lambda: False):
        """`send(offset, data)` delivers a batch; errors in `retryable` mean: try again later (until `give_up()`),
        any other error drops the batch (the server refused it: the job is not this runner's any more)."""
        self._send = send
        self._retryable = retryable
        self._give_up = give_up
        self._buf = bytearray()
        self._offset = 0  # where _buf starts in the output as shipped
        self._dropped = 0
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False  # closed by drain(): the rest is the caller's to deliver
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            if len(self._buf) > MAX_BUFFER:  # the server has been away long: keep the newest output
                cut = len(self._buf) - MAX_BUFFER // 2
                self._dropped += cut
                note = (f"\n[dstack: {self._dropped} bytes of output dropped while the server could not take "
                        f"them]\n").encode()
                self._buf[:cut] = note
            self._cond.notify()

    def _take(self) -> tuple[int, bytes]:
        data = bytes(self._buf[:MAX_BATCH])
        del self._buf[:MAX_BATCH]
        offset = self._offset
        self._offset += len(data)
        return offset, data

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
                offset, data = self._take()
            self._deliver(offset, data)

    def _deliver(self, offset: int, data: bytes) -> None:
        pause, failing = 0.2, None
        while True:
            try:
                self._send(offset, data)
                if failing:
                    log.info("output delivered again (the server takes it)")
                return
            except self._retryable as e:
                if failing is None:
                    log.warning("could not send %d bytes of output: %s; trying again until the server takes "
                                "them", len(data), e)
                failing = e
                if self._give_up():
                    self._dropped_batch(data, e)
                    return
            except Exception as e:  # refused: the job is not this runner's to report any more
                self._dropped_batch(data, e)
                return
            threading.Event().wait(pause)
            pause = min(pause * 2, MAX_PAUSE)

    def _dropped_batch(self, data: bytes, error: BaseException) -> None:
        """A batch that will never be on the server: later offsets do not count it (else the server, which
        appends at its log's end, would take the first bytes of a batch sent again for ones it has)."""
        log.error("dropped %d bytes of output: %s", len(data), error)
        with self._cond:
            self._offset -= len(data)

    def drain(self) -> tuple[int, bytes]:
        """Stop shipping and return the output not delivered yet and where it starts (at most MAX_BATCH bytes;
        anything before that is delivered here first), for the caller to send with the job's final status:
        one request instead of two, and the follower learns the end with the last bytes."""
        with self._cond:
            self._closed = self._draining = True
            self._closing.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()  # a batch in flight is delivered first
        with self._cond:
            rest, offset = bytes(self._buf), self._offset
            self._buf.clear()
            self._offset += len(rest)
        while len(rest) > MAX_BATCH:
            offset = self._offset - len(rest)  # less what was dropped meanwhile
            self._deliver(offset, rest[:MAX_BATCH])
            rest = rest[MAX_BATCH:]
        return self._offset - len(rest), rest

    def close(self) -> None:
        """Deliver everything written so far, then stop. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._closing.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()


class AsWritten:
    """A job's output as the job wrote it. Jobs write to a pseudo-terminal (so that programs line-buffer and
    progress bars redraw), which writes each "\n" as "\r\n" (ONLCR); this turns every "\r\n" back into
    "\n". That is exact: the terminal adds an "\r" before each "\n" and nowhere else, so a "\r\n" the job
    wrote itself arrives as "\r\r\n" and leaves as "\r\n", and a lone "\r" (a progress bar) is kept. A
    chunk's last "\r" waits for the next chunk (it may be half of a pair); flush() lets it go at the end."""

    def __init__(self, write: Callable[[bytes], None]):
        self._write = write
        self._held_cr = False

    def __call__(self, data: bytes) -> None:
        if self._held_cr:
            data, self._held_cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._held_cr = data[:-1], True
        if data:
            self._write(data.replace(b"\r\n", b"\n"))

    def flush(self) -> None:
        if self._held_cr:
            self._held_cr = False
            self._write(b"\r")

"""The runner's log shipping: batches in order, and what `drain` leaves for the final status."""

from __future__ import annotations

import threading
import time

from dstack.runner.logs import MAX_BATCH, LogShipper


def test_drain_returns_what_was_not_delivered_and_delivers_nothing_after():
    sent = []
    in_flight, release = threading.Event(), threading.Event()

    def send(data: bytes) -> None:
        in_flight.set()
        release.wait(5)  # the first batch is in flight while more is written
        sent.append(data)

    shipper = LogShipper(send)
    shipper.write(b"a")
    assert in_flight.wait(5)
    shipper.write(b"b")
    threading.Timer(0.2, release.set).start()
    rest = shipper.drain()
    assert sent == [b"a"]  # the batch in flight went first, on its own
    assert rest == b"b"
    shipper.close()  # after drain: nothing more is sent
    assert sent == [b"a"]


def test_drain_delivers_all_but_the_last_batch_itself():
    sent = []

    def slow_send(data: bytes) -> None:  # output piles up meanwhile
        time.sleep(0.05)
        sent.append(data)

    shipper = LogShipper(slow_send)
    big = bytes(range(256)) * (MAX_BATCH // 256 * 3 + 10)
    for i in range(0, len(big), 4096):
        shipper.write(big[i:i + 4096])
    rest = shipper.drain()
    assert 0 < len(rest) <= MAX_BATCH
    assert all(len(x) <= MAX_BATCH for x in sent)
    assert b"".join(sent) + rest == big

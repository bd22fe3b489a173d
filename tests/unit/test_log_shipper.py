"""The runner's log shipping: batches in order with their offsets, what `drain` leaves for the final status,
and output kept (never dropped) while the server cannot take it."""

from __future__ import annotations

import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from dstack.runner.logs import MAX_BATCH, AsWritten, LogShipper


class Refused(Exception):
    pass


def test_drain_returns_what_was_not_delivered_and_delivers_nothing_after():
    sent = []
    in_flight, release = threading.Event(), threading.Event()

    def send(offset: int, data: bytes) -> None:
        in_flight.set()
        release.wait(5)  # the first batch is in flight while more is written
        sent.append((offset, data))

    shipper = LogShipper(send)
    shipper.write(b"a")
    assert in_flight.wait(5)
    shipper.write(b"b")
    threading.Timer(0.2, release.set).start()
    rest = shipper.drain()
    assert sent == [(0, b"a")]  # the batch in flight went first, on its own
    assert rest == (1, b"b")
    shipper.close()  # after drain: nothing more is sent
    assert sent == [(0, b"a")]


def test_drain_delivers_all_but_the_last_batch_itself():
    sent = []

    def slow_send(offset: int, data: bytes) -> None:  # output piles up meanwhile
        time.sleep(0.05)
        sent.append((offset, data))

    shipper = LogShipper(slow_send)
    big = bytes(range(256)) * (MAX_BATCH // 256 * 3 + 10)
    for i in range(0, len(big), 4096):
        shipper.write(big[i:i + 4096])
    offset, rest = shipper.drain()
    assert 0 < len(rest) <= MAX_BATCH
    assert all(len(x) <= MAX_BATCH for _, x in sent)
    assert b"".join(x for _, x in sent) + rest == big
    # each batch says where it starts in the output
    starts = [o for o, _ in sent] + [offset]
    assert starts == [sum(len(x) for _, x in sent[:i]) for i in range(len(sent) + 1)]


def test_output_is_sent_again_until_the_server_takes_it_and_none_is_lost():
    """The server is away for a while (every send fails as if unreachable): nothing is dropped, the batch that
    failed is sent again with the same offset, and output written meanwhile follows in order."""
    sent, tries = [], []
    away = threading.Event()
    away.set()

    def send(offset: int, data: bytes) -> None:
        tries.append(offset)
        if away.is_set():
            raise ConnectionError("server unreachable")
        sent.append((offset, data))

    shipper = LogShipper(send, retryable=(ConnectionError,))
    lines = [f"line {i}\n".encode() for i in range(200)]
    for line in lines[:100]:
        shipper.write(line)
    deadline = time.monotonic() + 30
    while len(tries) < 3 and time.monotonic() < deadline:  # several tries fail meanwhile
        time.sleep(0.05)
    for line in lines[100:]:
        shipper.write(line)
    away.clear()
    shipper.close()
    assert len(tries) > 2 and tries[0] == tries[1] == 0  # the same batch again
    assert b"".join(x for _, x in sent) == b"".join(lines)


def test_a_refused_batch_is_dropped_and_the_rest_goes_on():
    sent = []

    def send(offset: int, data: bytes) -> None:
        if data.startswith(b"bad"):
            raise Refused("not your job")
        sent.append((offset, data))

    refused = threading.Event()

    def send_and_tell(offset: int, data: bytes) -> None:
        try:
            send(offset, data)
        finally:
            if data.startswith(b"bad"):
                refused.set()

    shipper = LogShipper(send_and_tell, retryable=(ConnectionError,))
    shipper.write(b"bad")
    assert refused.wait(30)
    shipper.write(b"good")
    shipper.close()
    assert sent == [(0, b"good")]  # the dropped batch is not counted: the server appends at its log's end


def test_a_runner_on_its_way_out_gives_up_after_all():
    tries = []

    def send(offset: int, data: bytes) -> None:
        tries.append(offset)
        raise ConnectionError("server unreachable")

    leaving = threading.Event()
    shipper = LogShipper(send, retryable=(ConnectionError,), give_up=leaving.is_set)
    shipper.write(b"x")
    time.sleep(0.5)
    leaving.set()
    done = threading.Thread(target=shipper.close)
    done.start()
    done.join(10)
    assert not done.is_alive() and tries


@given(st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\r").replace(b"y", b"\n")), st.data())
def test_output_as_written_is_exactly_what_the_job_wrote_before_its_terminal(written, data):
    """Whatever the job wrote (\\r, \\n, \\r\\n of its own, in any mix), cut into chunks anywhere: the terminal's
    "\\n" -> "\\r\\n" is undone exactly."""
    through_pty = written.replace(b"\n", b"\r\n")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(through_pty)), max_size=8)))
    got = []
    as_written = AsWritten(got.append)
    start = 0
    for cut in [*cuts, len(through_pty)]:
        as_written(through_pty[start:cut])
        start = cut
    as_written.flush()
    assert b"".join(got) == written

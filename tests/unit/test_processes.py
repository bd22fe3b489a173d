"""Processes of ours are known by pid and start time: a pid alone may be another program's by now."""

from __future__ import annotations

import os
import subprocess
import time

from dstack.core.processes import is_running, read_record, record, start_time, terminate


def _ticks_now() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")) + 1


def test_start_time_is_read_past_a_command_name_with_spaces_and_parentheses(tmp_path):
    odd = tmp_path / "a) b c"
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    try:
        time.sleep(0.2)
        with open(f"/proc/{child.pid}/comm") as f:
            assert f.read().strip() == "a) b c"
        started = start_time(child.pid)
        assert started is not None and start_time(os.getpid()) <= started <= _ticks_now()
    finally:
        child.kill()
        child.wait()
    assert start_time(child.pid) is None


def test_a_record_names_its_process_and_no_other(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    try:
        record(tmp_path / "r.json", child.pid, name="x")
        assert read_record(tmp_path / "r.json")["name"] == "x"
        assert is_running(child.pid, start_time(child.pid))
        assert not is_running(child.pid, start_time(child.pid) - 1)  # the same pid, another start: not ours
        assert not terminate(child.pid, 1, grace=0.1)  # never signalled
        assert child.poll() is None
        assert terminate(child.pid, start_time(child.pid), grace=5)
        assert child.wait(5) is not None
    finally:
        child.kill()
        child.wait()
    assert read_record(tmp_path / "r.json") is None

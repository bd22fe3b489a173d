"""The Ctrl-C prompt of an attached run: its answer, and what follows it starting a line of its own."""

from __future__ import annotations

import io
import sys

import pytest

from dstack.cli.attach import _ask


class Tty(io.StringIO):
    def __init__(self, text: str = "", interrupt: bool = False):
        super().__init__(text)
        self.interrupt = interrupt

    def isatty(self) -> bool:
        return True

    def readline(self, *a) -> str:
        if self.interrupt:
            raise KeyboardInterrupt
        return super().readline(*a)


@pytest.mark.parametrize(("stdin", "choice"), [
    (Tty(interrupt=True), "stop"),  # Ctrl-C at the prompt
    (Tty(""), "stop"),  # Ctrl-D
    (Tty("c\n"), "continue"),
    (Tty("\n"), "stop"),
])
def test_what_follows_the_prompt_starts_a_line_of_its_own(monkeypatch, capsys, stdin, choice):
    monkeypatch.setattr(sys, "stdin", stdin)
    assert _ask("lazy-raven-1") == choice
    err = capsys.readouterr().err
    assert "[c]ontinue: " in err
    # a typed answer ends its line itself (the terminal echoes it); ^C and Ctrl-D do not
    assert err.endswith("[c]ontinue: ") == stdin.getvalue().endswith("\n")

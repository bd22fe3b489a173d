"""Errors users see. Raised anywhere, turned into exit codes / HTTP statuses at the edges."""

from __future__ import annotations

from collections.abc import Iterable


class DstackError(Exception):
    """Base of every error a user may see. `exit_code` is what the CLI exits with."""

    exit_code = 1
    http_status = 400
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return self.message


class ConfigError(DstackError):
    """Bad user input in a file or on the command line; file/line/column where known (1-based)."""

    exit_code = 2
    http_status = 400
    kind = "config"

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ):
        super().__init__(message, hint)
        self.file = file
        self.line = line
        self.column = column

    @property
    def location(self) -> str | None:
        if not self.file:
            return None
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.column or 1}"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "file": self.file, "line": self.line, "column": self.column}


class NotFound(DstackError):
    exit_code = 2
    http_status = 404
    kind = "not_found"


class Conflict(DstackError):
    exit_code = 1
    http_status = 409
    kind = "conflict"


class Unsatisfiable(ConfigError):
    """No runner and no backend can ever provide what a job asks for. `most`: of each resource asked for that
    none has, the most one has (see core.resources.most_offered), for the hint that says what would fit."""

    exit_code = 2
    http_status = 422
    kind = "unsatisfiable"

    def __init__(self, message: str, hint: str | None = None, most: dict | None = None,
                 lacking: set[str] | None = None, **where):
        super().__init__(message, hint, **where)
        self.most = most or {}
        self.lacking = lacking or set()  # what some runner lacks beyond sizes: "docker", "labels"


class MissingCode(DstackError):
    """A run refers to code blobs the server does not have: the client uploads them and submits again."""

    exit_code = 1
    http_status = 409
    kind = "missing_code"

    def __init__(self, message: str, hint: str | None = None, blobs: list[str] | None = None):
        super().__init__(message, hint)
        self.blobs = blobs or []

    def to_dict(self) -> dict:
        return {**super().to_dict(), "blobs": self.blobs}


class Unauthorized(DstackError):
    exit_code = 1
    http_status = 401
    kind = "unauthorized"


class Forbidden(DstackError):
    """The caller is known, and may not do this: a runner's token used for anything but a runner's work."""

    exit_code = 1
    http_status = 403
    kind = "forbidden"


class Unavailable(DstackError):
    """The server cannot do it now (it is stopping, or it cannot write what it must keep): try again later.
    Runners retry what they report until it is taken; the CLI says what is wrong."""

    exit_code = 1
    http_status = 503
    kind = "unavailable"


ERROR_KINDS: dict[str, type[DstackError]] = {
    cls.kind: cls for cls in (DstackError, ConfigError, NotFound, Conflict, Unsatisfiable, MissingCode, Unauthorized,
                              Forbidden, Unavailable)
}


def error_from_dict(data: dict) -> DstackError:
    cls = ERROR_KINDS.get(data.get("kind", "error"), DstackError)
    kwargs = {"hint": data.get("hint")}
    if issubclass(cls, ConfigError):
        kwargs.update(file=data.get("file"), line=data.get("line"), column=data.get("column"))
    if cls is MissingCode:
        kwargs.update(blobs=list(data.get("blobs") or []))
    return cls(data.get("message", "unknown error"), **kwargs)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest choice, if any is close enough."""
    import difflib  # only when something is wrong: not on every command's start

    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None

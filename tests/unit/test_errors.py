from __future__ import annotations

import pytest

from dstack.core.errors import (
    ConfigError,
    Conflict,
    DstackError,
    NotFound,
    Unauthorized,
    Unsatisfiable,
    did_you_mean,
    error_from_dict,
)


def test_config_error_exits_with_2_and_says_where():
    err = ConfigError("bad", hint="fix it", file=".dstack/workflows.yaml", line=3, column=5)
    assert err.exit_code == 2 and err.http_status == 400
    assert str(err) == "bad"
    assert err.location == ".dstack/workflows.yaml:3:5"


def test_location_without_line_or_file():
    assert ConfigError("bad", file="f").location == "f"
    assert ConfigError("bad").location is None
    assert ConfigError("bad", file="f", line=2).location == "f:2:1"


@pytest.mark.parametrize(
    ("cls", "exit_code", "status"),
    [(DstackError, 1, 400), (NotFound, 2, 404), (Conflict, 1, 409), (Unsatisfiable, 2, 422), (Unauthorized, 1, 401)],
)
def test_each_error_kind_has_its_exit_code_and_http_status(cls, exit_code, status):
    assert (cls.exit_code, cls.http_status) == (exit_code, status)


@pytest.mark.parametrize(
    "err",
    [
        ConfigError("bad", hint="h", file="f", line=1, column=2),
        NotFound("no run 'x'"),
        Conflict("tag exists", hint="use --force"),
        Unsatisfiable("no GPU"),
        Unauthorized("bad token"),
        DstackError("oops"),
    ],
)
def test_errors_round_trip_through_dicts(err):
    back = error_from_dict(err.to_dict())
    assert type(back) is type(err)
    assert back.to_dict() == err.to_dict()


def test_unknown_kind_becomes_a_plain_error():
    err = error_from_dict({"kind": "martian", "message": "?"})
    assert type(err) is DstackError and err.message == "?"
    assert error_from_dict({}).message == "unknown error"


def test_did_you_mean():
    assert did_you_mean("comands", ["commands", "image"]) == "did you mean 'commands'?"
    assert did_you_mean("zzz", ["commands", "image"]) is None
    assert did_you_mean("x", []) is None

"""The URL that runners a backend starts are given: DSTACK_SERVER_PUBLIC_URL, else the bound address."""

import socket
from pathlib import Path

from dstack.server.context import Settings


def test_runner_url():
    bound = Settings(home=Path("/x"), db_url="sqlite://", token="t", host="10.0.0.5", port=3000)
    assert bound.runner_url == "http://10.0.0.5:3000"
    wildcard = Settings(home=Path("/x"), db_url="sqlite://", token="t", host="0.0.0.0", port=3000)
    assert wildcard.runner_url == f"http://{socket.getfqdn()}:3000"
    public = Settings(home=Path("/x"), db_url="sqlite://", token="t", host="0.0.0.0", port=3000,
                      public_url="http://login.hpc:3000/")
    assert public.runner_url == "http://login.hpc:3000"

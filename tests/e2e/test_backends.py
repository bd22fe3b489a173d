"""`dstack backends` and `dstack limits` through the CLI, against a real EC2 API (moto on loopback) for `aws`: a
backend is checked before it is kept, its credentials are stored encrypted and never shown, logged or returned,
and limits decide what may be started (a job that only a refused offer could run fails at submission)."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Dstack

ACCESS_KEY = "AKIAQXE2ETESTKEYID01"
SECRET_KEY = "e2eSecretKey/mustNeverBeShown+0123456789"
CATALOG = """\
instance_name,location,price,cpu,memory,gpu_count,gpu_name,gpu_memory,spot,disk_size,gpu_vendor,flags,cpu_arch,provider_data
t3.medium,us-east-1,0.0416,2,4.0,0,,,False,,,,x86,{}
g5.xlarge,us-east-1,1.006,4,16.0,1,A10G,24.0,False,,nvidia,,x86,{}
"""


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_backend_is_checked_kept_encrypted_and_never_shown(tmp_path, project, moto_url):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "aws.csv").write_text(CATALOG)
    d = Dstack(tmp_path / "home", env={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    root = project("workflows:\n  - name: big\n    commands: [echo hi]\n    resources:\n      gpu: 1\n")
    settings = ["--set", f"endpoint_url={moto_url}", "--set", f"catalog_dir={catalog}", "--set", "regions=[us-east-1]"]
    try:
        kinds = d("backends", "kinds", cwd=root, check=True).stdout
        assert "aws:" in kinds and "secret_access_key" in kinds and "AWS_SECRET_ACCESS_KEY" in kinds, kinds
        # wrong: an API that cannot be reached; a setting it does not have; a secret on the command line
        bad = d("backends", "add", "aws", "--set", f"endpoint_url=http://127.0.0.1:{_closed_port()}", cwd=root)
        assert bad.returncode != 0 and "does not work" in bad.stderr and "Traceback" not in bad.stderr, bad
        typo = d("backends", "add", "aws", "--set", "region=us-east-1", cwd=root)
        assert typo.returncode == 2 and "has no setting 'region' (did you mean 'regions'?)" in typo.stderr, typo
        leak = d("backends", "add", "aws", "--set", f"secret_access_key={SECRET_KEY}", cwd=root)
        assert leak.returncode == 2 and "is a credential: not on the command line" in leak.stderr, leak
        nokind = d("backends", "add", "awz", cwd=root)
        assert nokind.returncode == 2 and "no backend kind 'awz' is installed" in nokind.stderr, nokind
        assert [b["name"] for b in json.loads(d("backends", "--json", cwd=root, check=True).stdout)] == ["local"]

        added = d("backends", "add", "aws", *settings, cwd=root, check=True)
        assert "Added backend aws (aws): account 123456789012" in added.stdout, added.stdout
        listed = json.loads(d("backends", "--json", cwd=root, check=True).stdout)
        aws = next(b for b in listed if b["name"] == "aws")
        assert aws["secrets"] == ["access_key_id", "secret_access_key"] and aws["settings"]["regions"] == ["us-east-1"]
        assert "works" in d("backends", "test", "aws", cwd=root, check=True).stdout
        again = d("backends", "add", "aws", *settings, cwd=root)
        assert again.returncode != 0 and "a backend named 'aws' exists" in again.stderr, again

        # limits: a price cap under every GPU offer makes a GPU job fail at submission, saying why
        assert "at most 2" in d("limits", "set", "aws", "--max-total", "2", "--max-price", "0.5", cwd=root,
                                check=True).stdout
        refused = d("run", "big", cwd=root)
        assert refused.returncode != 0 and "only offers that the backends' limits refuse" in refused.stderr, refused
        assert "$1.01/h is over the price cap of $0.50/h" in refused.stderr, refused.stderr
        wrong = d("limits", "set", "nosuch", "--max-total", "1", cwd=root)
        assert wrong.returncode != 0 and "no backend named 'nosuch'" in wrong.stderr, wrong
        per_type = d("limits", "set", "aws", "--max-per-type", "g5.xlarge", cwd=root)
        assert per_type.returncode == 2 and "expected TYPE=N" in per_type.stderr, per_type
        assert json.loads(d("limits", "--json", cwd=root, check=True).stdout)["aws"]["max_total"] == 2
        d("limits", "remove", "aws", cwd=root, check=True)
        assert json.loads(d("limits", "--json", cwd=root, check=True).stdout)["aws"]["max_total"] is None

        # the secret is in no answer, no log, no database file; the key that seals it is outside the database
        answers = [d(*args, cwd=root, check=True).stdout for args in
                   (["backends", "--json"], ["backends", "test", "aws", "--json"], ["limits", "--json"])]
        server = tmp_path / "home" / "server"
        key = server / "backends.key"
        assert key.stat().st_mode & 0o777 == 0o600
        for path in [p for p in server.rglob("*") if p.is_file()]:
            assert SECRET_KEY.encode() not in path.read_bytes(), f"the secret is in {path}"
            assert ACCESS_KEY.encode() not in path.read_bytes(), f"the access key is in {path}"
        for text in answers:
            assert SECRET_KEY not in text and ACCESS_KEY not in text
        # a server restart opens the sealed credentials again
        d.stop_server()
        assert "works" in d("backends", "test", "aws", cwd=root, check=True).stdout
        removed = d("backends", "remove", "aws", cwd=root, check=True)
        assert "Removed backend aws" in removed.stdout
        assert [b["name"] for b in json.loads(d("backends", "--json", cwd=root, check=True).stdout)] == ["local"]
    finally:
        d.stop_server()


def test_a_disabled_local_backend_refuses_at_submission_and_says_so(tmp_path, project):
    d = Dstack(tmp_path / "home")
    root = project("workflows:\n  - name: hello\n    commands: [echo hello]\n")
    try:
        d("limits", "set", "local", "--disable", cwd=root, check=True)
        refused = d("run", "hello", cwd=root)
        assert refused.returncode != 0 and "local (it is disabled)" in refused.stderr, refused
        assert "Traceback" not in refused.stderr
        gone = d("backends", "remove", "local", cwd=root)
        assert gone.returncode != 0 and "the local backend is built in" in gone.stderr, gone
        d("limits", "set", "local", "--enable", cwd=root, check=True)
        assert "hello" in d("run", "hello", cwd=root, check=True).stdout
    finally:
        d.stop_server()


def test_backend_commands_say_what_they_do():
    from click.testing import CliRunner

    from dstack.cli.backends import backends, limits

    for group, words in ((backends, ["add KIND", "test NAME", "remove NAME", "kinds"]),
                         (limits, ["set BACKEND", "remove BACKEND"])):
        out = CliRunner().invoke(group, ["--help"]).output
        assert all(w in out for w in words), out
    out = CliRunner().invoke(limits, ["set", "--help"]).output
    for option in ("--max-total", "--max-per-type", "--max-price", "--regions", "--instance-types", "--spot",
                   "--idle-timeout", "--enable / --disable"):
        assert option in out, out


def test_limits_and_settings_are_checked_where_they_are_kept(tmp_path):
    from dstack.core.backends import Limits

    lim = Limits(regions=["us-east-1"], spot="on-demand", max_price=1.0)
    assert lim.refusal("g5.xlarge", "eu-west-1", False, 0.5) == "region eu-west-1 is not allowed (us-east-1)"
    assert lim.refusal("g5.xlarge", "us-east-1", True, 0.5) == "only on-demand instances are allowed"
    assert lim.refusal("g5.xlarge", "us-east-1", False, 1.5) == "$1.50/h is over the price cap of $1.00/h"
    assert lim.refusal("g5.xlarge", "us-east-1", False, 0.5) is None
    assert Limits(enabled=False).refusal(None, None, False, 0) == "the backend is disabled"
    with pytest.raises(ValueError, match="cannot be negative"):
        Limits(max_per_type={"t3.medium": -1})
    from dstack.server.services.secrets import Sealer, server_id

    sealer = Sealer(tmp_path)
    token = sealer.seal({"secret": "s3cr3t"})
    assert "s3cr3t" not in token and sealer.open(token, "x") == {"secret": "s3cr3t"}
    assert server_id(tmp_path) == server_id(tmp_path) and len(server_id(tmp_path)) == 16
    (tmp_path / "backends.key").unlink()
    from dstack.core.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be opened with"):
        Sealer(tmp_path).open(token, "x")  # a new key: the old seal does not open
    Path(tmp_path / "backends.key").write_text("not a key")
    with pytest.raises(ConfigError, match="is not a key"):
        Sealer(tmp_path).seal({})


def test_a_lowered_limit_ends_idle_runners_at_once_and_lets_busy_ones_finish(tmp_path, project, shared):
    d = Dstack(tmp_path / "home")
    root = project(f"""\
    workflows:
      - name: hello
        commands: [echo hello]
      - name: slow
        commands: ["touch {shared}/started; sleep 4; echo slow done"]
    """)

    def runners() -> list[dict]:
        return json.loads(d("runners", "--json", cwd=root, check=True).stdout)

    def eventually(condition, what: str, within: float = 30.0):
        deadline = time.monotonic() + within
        while not (value := condition()):
            assert time.monotonic() < deadline, what
            time.sleep(0.2)
        return value

    try:
        d("run", "hello", cwd=root, check=True)
        assert len(runners()) == 1  # idle now, for its idle timeout (5 minutes)
        d("limits", "set", "local", "--max-total", "0", cwd=root, check=True)
        eventually(lambda: runners() == [], "the idle runner over the lowered limit goes at once")
        d("limits", "remove", "local", cwd=root, check=True)
        name = json.loads(d("run", "slow", "-d", "--json", cwd=root, check=True).stdout)["run_name"]
        eventually(lambda: (shared / "started").exists(), "the slow job starts")
        d("limits", "set", "local", "--max-total", "0", cwd=root, check=True)
        busy = eventually(lambda: [r for r in runners() if r["draining"]], "the busy runner is drained")
        assert busy[0]["jobs"], busy  # still running its job
        assert d.wait_status(root, name, {"DONE", "FAILED"}, timeout=60)["status"] == "DONE"
        assert "slow done" in d("logs", name, cwd=root, check=True).stdout
        eventually(lambda: runners() == [], "once its job is done, the runner goes")
        eventually(lambda: next(b for b in json.loads(d("backends", "--json", cwd=root, check=True).stdout)
                                if b["name"] == "local")["instances"] == 0, "its process is gone too")
    finally:
        d.stop_server()

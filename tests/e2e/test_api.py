"""The HTTP API as another client (a script, the web UI) uses it: a run is its workflow's files and a name;
the server resolves it and says where the files are wrong. And the CLI's own imports stay lean."""

from __future__ import annotations

import json

import httpx

from tests.e2e.conftest import last_run

WORKFLOWS = """\
workflows:
  - name: hello
    commands:
      - echo "hello from $RUN_NAME, $greeting"
"""


def _api(dstack, cwd):
    dstack("status", cwd=cwd, check=True)  # the local server runs
    info = json.loads((dstack.home / "server" / "server.json").read_text())
    token = (dstack.home / "server" / "token").read_text().strip()
    return httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_a_run_submitted_over_http_is_resolved_by_the_server(dstack, project):
    root = project(WORKFLOWS)
    api = _api(dstack, root)
    r = api.post("/api/runs", json={
        "repo_id": str(root), "workflow": "hello", "args": ["--greeting", "hi there"],
        "files": {".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": "variables:\n  hello:\n"
                  "    greeting: hey\n"}})
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["variables"] == {"greeting": "hi there"} and run["overrides"] == {"greeting": "hi there"}
    [job] = run["jobs"]
    assert job["spec"]["env"]["GREETING"] == "hi there"
    done = dstack.wait_status(root, run["run_name"], {"DONE", "FAILED"})
    assert done["status"] == "DONE", done
    out = dstack("logs", run["run_name"], cwd=root, check=True).stdout
    assert f"hello from {run['run_name']}, hi there" in out


def test_bad_files_over_http_are_a_located_config_error(dstack, project):
    root = project(WORKFLOWS)
    api = _api(dstack, root)
    before = len(dstack.runs(root))
    cases = [
        ({".dstack/workflows.yaml": WORKFLOWS.replace("commands:", "comands:")}, [],
         (".dstack/workflows.yaml", 3, 5), "did you mean 'commands'?"),
        ({".dstack/workflows.yaml": WORKFLOWS}, ["--greting", "x"], (None, None, None), None),
        ({}, [], (None, None, None), "dstack init"),
        ({".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": "variables: [1]\n"}, [],
         (".dstack/variables.yaml", 1, 12), None),
    ]
    for files, args, (file, line, column), hint in cases:
        r = api.post("/api/runs", json={"repo_id": str(root), "workflow": "hello", "args": args, "files": files,
                                        "project": str(root)})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["kind"] == "config" and (err["file"], err["line"], err["column"]) == (file, line, column), err
        if hint:
            assert hint in (err["hint"] or ""), err
    assert len(dstack.runs(root)) == before, "nothing was submitted"


def test_run_and_status_import_neither_models_nor_server_libraries(dstack, project):
    """`dstack run` sends the files and follows the run on the API's JSON: no pydantic, no YAML parser;
    `dstack status` neither, and neither loads FastAPI, SQLAlchemy, the Docker SDK or boto3."""
    root = project(WORKFLOWS, "variables:\n  hello:\n    greeting: hey\n")
    heavy = ("pydantic", "yaml", "fastapi", "sqlalchemy", "docker", "boto3", "httpx", "rich")
    for args in (["run", "hello", "--greeting", "x"], ["status"], ["--help"]):
        r = dstack(*args, cwd=root, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert r.returncode == 0, r.stderr
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "dstack.cli.main" in imported, r.stderr[-500:]
        loaded = sorted(m for m in imported if m.split(".")[0] in heavy)
        assert not loaded, (args, loaded)


def test_run_json_is_the_apis_run_with_units_in_its_keys(dstack, project):
    root = project("workflows:\n  - name: r\n    commands: [echo]\n    resources: {memory: 1GB, shm_size: 64MB}\n")
    run = json.loads(dstack("run", "r", "--json", cwd=root, check=True).stdout)
    assert run["jobs"][0]["spec"]["requirements"]["memory_mib"] == 1024
    assert run["jobs"][0]["spec"]["requirements"]["shm_size_mib"] == 64
    assert run["submitted_at"].endswith("Z") and run["status"] == "SUBMITTED"


def test_following_a_finished_run_prints_all_of_a_large_output(dstack, project):
    # more than one log poll's worth (4 MiB), all there before the first poll
    root = project("workflows:\n  - name: big\n    commands: [\"head -c 6000007 /dev/zero | tr '\\\\0' x\"]\n")
    name = json.loads(dstack("run", "big", "--json", cwd=root, check=True).stdout)["run_name"]
    assert dstack.wait_status(root, name, {"DONE", "FAILED"})["status"] == "DONE"
    r = dstack("logs", name, "-f", cwd=root, binary=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"x") == 6000007


def test_a_variable_named_like_a_run_option_is_set_after_a_double_dash(dstack, project):
    root = project("workflows:\n  - name: v\n    commands: [echo \"tag=$tag\"]\n",
                   "variables:\n  v:\n    tag: one\n")
    r = dstack("run", "v", "--", "--tag", "two", cwd=root)
    assert r.returncode == 0 and "tag=two" in r.stdout, (r.stdout, r.stderr)
    assert "Tagged" not in r.stderr


def test_ctrl_c_while_a_run_is_submitted_stops_it_once_it_is_known(dstack, project, capsys):
    import os
    import signal

    from dstack.api.client import Client
    from dstack.cli.run import _attach, _deferring_interrupts

    workflows = "workflows:\n  - name: slow\n    commands: [sleep 60]\n"
    root = project(workflows)
    api = _api(dstack, root)
    client = Client(str(api.base_url), api.headers["Authorization"].split()[1])

    def submit():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the server answers
        return client.submit({"repo_id": str(root), "workflow": "slow", "files": {".dstack/workflows.yaml": workflows}})

    submitted, interrupted = _deferring_interrupts(submit)
    assert interrupted and submitted["run_name"]
    try:
        _attach(client, submitted, "slow", detach=True, as_json=False, interrupted=True)
    except SystemExit as e:
        assert e.code == 130
    assert "Interrupted: stopping" in capsys.readouterr().err
    assert dstack.wait_status(root, submitted["run_name"], {"STOPPED", "DONE", "FAILED"})["status"] == "STOPPED"


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback():
    import subprocess
    import sys

    # a Ctrl-C that lands while `dstack` imports its CLI (the signal raises KeyboardInterrupt there)
    code = ("import os, signal, sys\n"
            "class Finder:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'dstack.cli.main':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Finder())\n"
            "from dstack.cli.entry import main\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, (r.returncode, r.stderr)


def test_text_that_is_not_unicode_is_refused_clearly_and_nothing_is_stored(dstack, project):
    """Bytes that are not UTF-8 (a mis-encoded terminal) arrive as lone surrogates: once stored, no answer could
    show them, and every listing failed. Over HTTP, on the command line, and from a YAML escape."""
    variables = "variables:\n  hello:\n    greeting: hey\n"
    root = project(WORKFLOWS, variables)
    api = _api(dstack, root)
    before = len(dstack.runs(root))
    body = ('{"repo_id": "r", "workflow": "hello", "args": ["--greeting", "bad\\udcffbyte"], "files": '
            + json.dumps({".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": variables}) + "}")
    r = api.post("/api/runs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "is not UTF-8 text" in r.json()["error"]["message"], r.text
    r = api.post("/api/tags", content='{"repo_id": "r", "run_name": "x\\udcff", "tag": "t"}',
                 headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text  # a clean refusal, its message encodable
    r = dstack("run", "hello", "--greeting", b"bad\xffbyte", cwd=root)
    assert r.returncode == 2 and "error: the argument 'bad\\xffbyte' is not UTF-8 text" in r.stderr, r.stderr
    escaped = project(WORKFLOWS.replace("    commands:", '    env:\n      X: "a\\udcffb"\n    commands:', 1),
                      variables, name="escaped")
    r = dstack("run", "hello", cwd=escaped)
    assert r.returncode == 2, r.stderr
    assert ".dstack/workflows.yaml:4:10: error: a '\\u' escape here is half of a UTF-16 pair" in r.stderr, r.stderr
    paired = project(WORKFLOWS.replace("    commands:", '    env:\n      X: "\\ud83d\\ude00"\n    commands:', 1)
                     .replace("$greeting", "$greeting $X"), variables, name="paired")  # as JSON writers escape it
    r = dstack("run", "hello", cwd=paired)
    assert r.returncode == 0 and "hey 😀" in r.stdout, (r.stdout, r.stderr)
    assert len(dstack.runs(root)) == before
    assert dstack("status", cwd=root).returncode == 0
    r = dstack("logs", "é-no-such-run", cwd=root)  # any character reaches the server
    assert r.returncode == 2 and "no run or job named 'é-no-such-run'" in r.stderr, r.stderr
    r = dstack("tag", last_run(dstack, paired)["run_name"], b"t\xff", cwd=paired)
    assert r.returncode == 2 and "not Unicode" in r.stderr, r.stderr
    # a local folder's name need not be UTF-8: it is not refused for what it is
    r = dstack("artifacts", "download", "no-such-run", "-o", b"caf\xe9", cwd=root)
    assert r.returncode == 2 and "no run or job named 'no-such-run'" in r.stderr, r.stderr

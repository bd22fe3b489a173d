"""Providers a project writes itself in `.dstack/providers.yaml` (no package), and a third-party provider installed
from a package through the entry-point group `dstack.providers`, exactly as the built-in ones register."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PROVIDERS = """\
providers:
  - name: greet
    help: Say hello to someone
    keys: {who: world, times: 1}
    commands:
      - for i in $(seq ${{ times }}); do echo "hello ${{ who }} ($WHO)"; done
  - name: strict
    keys: [target]
    commands: [echo "to $target"]
"""


def test_providers_yaml(dstack, project):
    root = project("""\
    workflows:
      - name: hi
        provider: greet
        who: researchers
        times: 2
      - name: default
        provider: greet
      - name: missing
        provider: strict
      - name: typo
        provider: greet
        whom: x
      - name: own-commands
        provider: greet
        commands: [echo mine]
    """)
    (root / ".dstack" / "providers.yaml").write_text(PROVIDERS)
    r = dstack("run", "hi", cwd=root, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.replace("\r", "").count("hello researchers (researchers)\n") == 2, r.stdout
    assert "hello world (world)" in dstack("run", "default", cwd=root, timeout=120).stdout
    missing = dstack("run", "missing", cwd=root)
    assert missing.returncode == 2 and "workflow 'missing' is missing 'target'" in missing.stderr, missing.stderr
    typo = dstack("run", "typo", cwd=root)
    assert typo.returncode == 2 and "unknown key 'whom'" in typo.stderr and "'who'" in typo.stderr, typo.stderr
    own = dstack("run", "own-commands", cwd=root)
    assert own.returncode == 2 and "runs its own commands" in own.stderr, own.stderr
    (root / ".dstack" / "providers.yaml").write_text("providers:\n  - name: greet\n    comands: [x]\n")
    broken = dstack("run", "hi", cwd=root)
    assert broken.returncode == 2 and ".dstack/providers.yaml:3:5: error: unknown key 'comands'" in broken.stderr, \
        broken.stderr


ENTRY_POINTS = "[dstack.providers]\nhello = dstack_hello:HelloProvider\n"


def _wheel(folder: Path, files: dict[str, bytes], entry_points: str) -> Path:
    """The package as a wheel (what `pip wheel` of a pyproject.toml that names the entry point would make)."""
    import base64
    import hashlib
    import zipfile

    info = "dstack_hello_provider-0.1.0.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: dstack-hello-provider\nVersion: 0.1.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/entry_points.txt": entry_points.encode()}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    path = folder / "dstack_hello_provider-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{info}/RECORD", record)
    return path
PACKAGE_MODULE = '''\
"""`hello`: a third-party provider, written as any package would."""
from dstack.core.models import JobSpec
from dstack.providers.base import Provider, WorkflowSpec


class HelloSpec(WorkflowSpec):
    """Greets `who`."""
    who: str = "world"


class HelloProvider(Provider):
    name = "hello"
    Spec = HelloSpec

    def create_jobs(self, spec, env):
        return [JobSpec(workflow=spec.name, provider=self.name, commands=[f"echo hello from a package, {spec.who}"],
                        env=env)]
'''


def test_a_provider_from_a_package(tmp_path, dstack, project):
    wheel = _wheel(tmp_path, {"dstack_hello.py": PACKAGE_MODULE.encode()}, ENTRY_POINTS)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # its own server (this package on its path), and the CLI
    from tests.dstack_server import Server
    from tests.e2e.conftest import Dstack

    env_path = f"{target}:{Path(__file__).parents[2]}"
    server = Server(tmp_path / "home", env={"PYTHONPATH": env_path})
    try:
        d = Dstack(tmp_path / "client", env={"PYTHONPATH": env_path})
        d.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
        listed = d("providers", "hello", cwd=tmp_path, check=True).stdout
        assert listed.startswith("hello: `hello`: a third-party provider") and "who" in listed, listed
        root = project(textwrap.dedent("""\
        workflows:
          - name: hi
            provider: hello
            who: dstack
        """))
        assert "1 workflow OK" in d("validate", cwd=root, check=True).stdout
        server.runner("x")  # a runner registered (the job's spec is what is looked at)
        r = d("run", "hi", "-d", "--json", cwd=root, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        import json

        run = json.loads(r.stdout)
        assert run["jobs"][0]["spec"]["commands"] == ["echo hello from a package, dstack"], run
    finally:
        server.stop()

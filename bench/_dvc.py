"""The DVC side of bench/artifacts.py: DVC through its Python API in its own venv, and its steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _artifacts_data import rm, sh, sync

DVC_VENV = Path("/tmp/dstack-bench-dvc-venv")
MARK = "@@dvcbench "

# The DVC side: one long-lived process in DVC's own venv; one JSON request per line on stdin, one
# reply line (prefixed by MARK, as DVC prints to stdout too) per request.
DVC_WORKER = r'''
import json, os, sys, time
from dvc.repo import Repo
MARK = "@@dvcbench "

def reply(obj):
    sys.__stdout__.write(MARK + json.dumps(obj) + "\n")
    sys.__stdout__.flush()

for line in sys.stdin:
    req = json.loads(line)
    op, root = req["op"], req.get("repo")
    try:
        out = {}
        if op == "init":
            os.makedirs(root, exist_ok=True)
            Repo.init(root, no_scm=True)
        elif op == "cache_type":
            with Repo(root) as r:
                with r.config.edit("local") as conf:
                    conf["cache"]["type"] = req["type"]
        elif op in ("add", "checkout"):
            os.chdir(root)
            t0 = time.perf_counter()
            with Repo(root) as r:
                if op == "add":
                    r.add(req["target"])
                else:
                    r.checkout(targets=[req["target"] + ".dvc"])
            out["t"] = time.perf_counter() - t0
        elif op == "version":
            import dvc
            out["version"] = dvc.__version__
        reply(out)
    except Exception as e:
        reply({"error": f"{type(e).__name__}: {e}"})
'''



class Dvc:
    """DVC through its Python API in its own venv (one process, so no CLI start per step)."""

    def __init__(self, venv: Path, site_cache: Path, log: Path):
        self.venv = venv
        self.env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(site_cache)}
        self.log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), "-c", DVC_WORKER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=self.env, text=True, bufsize=1)

    def call(self, **req) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the DVC worker died; see {self.log.name}")
            if line.startswith(MARK):
                out = json.loads(line[len(MARK):])
                if "error" in out:
                    raise RuntimeError(f"DVC {req}: {out['error']}")
                return out

    def cli_start(self, n: int = 3) -> list[float]:
        return [sh([str(self.venv / "bin" / "dvc"), "version"], env=self.env) for _ in range(n)]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def ensure_dvc(venv: Path) -> bool:
    if (venv / "bin" / "dvc").exists():
        return True
    print(f"creating {venv} and installing DVC from PyPI (one-off, not timed)...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "dvc"], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"  DVC could not be installed ({e}); skipping DVC", flush=True)
        return False
    return True

def dvc_round(dvc: Dvc, src: Path, repo: Path, t: dict[str, list], info: dict, big: bool,
              keep_files: bool) -> None:
    dvc.call(op="init", repo=str(repo))
    data = repo / "data"
    if big:
        data.mkdir()
        sh(["cp", str(src), str(data / src.name)])
    else:
        sh(["cp", "-r", str(src), str(data)])
    sync()
    t["dvc_add"].append(dvc.call(op="add", repo=str(repo), target="data")["t"])
    t["dvc_add_sync"].append(sync())
    t["dvc_add2"].append(dvc.call(op="add", repo=str(repo), target="data")["t"])
    # "mount": the data moved aside (not deleted: see ext4 above), then checked out from the cache
    os.rename(data, repo / "data.added")
    sync()
    t["dvc_checkout"].append(dvc.call(op="checkout", repo=str(repo), target="data")["t"])
    t["dvc_checkout2"].append(dvc.call(op="checkout", repo=str(repo), target="data")["t"])
    info["dvc_default_link"] = link_kind(repo, data)
    os.rename(data, repo / "data.copied")
    dvc.call(op="cache_type", repo=str(repo), type="hardlink")
    t["dvc_checkout_hl"].append(dvc.call(op="checkout", repo=str(repo), target="data")["t"])
    t["dvc_checkout_hl2"].append(dvc.call(op="checkout", repo=str(repo), target="data")["t"])
    info["dvc_hardlink_link"] = link_kind(repo, data)
    if big or not keep_files:
        rm(repo)


def link_kind(repo: Path, data: Path) -> str:
    """How DVC's checkout made a workspace file: a hard link to its cache file, or a separate file."""
    f = next(p for p in data.rglob("*") if p.is_file())
    st = os.stat(f)
    cached = {(c.stat().st_dev, c.stat().st_ino) for c in (repo / ".dvc" / "cache").rglob("*") if c.is_file()}
    if (st.st_dev, st.st_ino) in cached:
        return f"hardlink (nlink {st.st_nlink})"
    return "copy (separate inode; ext4 has no reflink)"


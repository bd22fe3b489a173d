"""Shared helpers of the benchmarks: fresh DSTACK_HOME, timed commands, interleaved pairs, tables, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent  # the venv's bin: dstack, python
DSTACK = str(BIN / "dstack")
PYTHON = sys.executable


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release()}


def fresh_home(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"dstack-bench-{prefix}-"))


_compiled = False


def ensure_bytecode() -> None:
    """Byte-compile dstack once, as `pip install .` does at install time (and as Python does on a first import
    unless PYTHONDONTWRITEBYTECODE is set, as it is on these machines): otherwise every command measured
    would compile dstack's modules from source first."""
    global _compiled
    if not _compiled:
        import dstack

        subprocess.run([PYTHON, "-m", "compileall", "-q", str(Path(dstack.__file__).parent)], check=True)
        _compiled = True


def env_for(home: Path) -> dict[str, str]:
    ensure_bytecode()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSTACK_SERVER_URL", "DSTACK_TOKEN", "DSTACK_DATABASE_URL")}
    env["DSTACK_HOME"] = str(home)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def make_project(root: Path, workflows_yaml: str, git: bool = True) -> Path:
    """A project folder with .dstack/workflows.yaml; a git repo with one commit (the usual case) when `git`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".dstack").mkdir(exist_ok=True)
    (root / ".dstack" / "workflows.yaml").write_text(workflows_yaml)
    if git:
        genv = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=root, env=genv, check=True, capture_output=True)
    return root


def run_timed(cmd: list[str], cwd: Path | None = None, env: dict | None = None, check: bool = True,
              expect: bytes | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of one command (output captured; exit code and, if given, expected stdout checked)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    dt = time.perf_counter() - t0
    if (check and p.returncode != 0) or (expect is not None and expect not in p.stdout):
        raise RuntimeError(f"{cmd} exited {p.returncode}:\n{p.stdout.decode(errors='replace')[-2000:]}"
                           f"\n{p.stderr.decode(errors='replace')[-2000:]}")
    return dt, p


def timed(cmd: list[str], **kw) -> float:
    return run_timed(cmd, **kw)[0]


def interleaved(cases: dict[str, tuple[list[str], dict]], n: int, settle: float = 0.0) -> dict[str, list[float]]:
    """Run the cases in turn (A B A B ...), n rounds; case -> wall times. Each case: (cmd, run kwargs).
    `settle`: seconds of pause before each command, so that what the previous one left running in the
    background (a container's removal, a runner warming the next container) does not share its CPU."""
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        for name, (cmd, kw) in cases.items():
            time.sleep(settle)
            out[name].append(timed(cmd, **kw))
    return out


def stats(xs: list[float]) -> dict:
    qs = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"n": len(xs), "median": statistics.median(xs), "p25": qs[0], "p75": qs[2], "min": min(xs),
            "max": max(xs), "samples": [round(x, 5) for x in xs]}


def verdict(value: float, target: float) -> str:
    return "PASS" if value < target else "FAIL"


def print_table(rows: list[dict], cols: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def code_state() -> dict:
    """Which code was measured: HEAD and the files changed on top of it."""
    def git(*args: str) -> str:
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    changed = git("status", "--porcelain", "--", "src").splitlines()
    diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=REPO, capture_output=True).stdout
    import hashlib

    return {"head": git("rev-parse", "HEAD"), "src_changed": changed,
            "src_diff_sha256": hashlib.sha256(diff).hexdigest()[:16]}


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
            "loadavg_at_end": os.getloadavg(), "code": code_state(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {path}")
    return path


@contextlib.contextmanager
def local_server_home(prefix: str, keep: bool = False):
    """A fresh DSTACK_HOME; whatever server (and runners) it started is stopped at the end."""
    home = fresh_home(prefix)
    env = env_for(home)
    try:
        yield home, env
    finally:
        subprocess.run([DSTACK, "server", "stop"], env=env, capture_output=True, timeout=60)
        if not keep:
            shutil.rmtree(home, ignore_errors=True)

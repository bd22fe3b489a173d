"""Upload and download of a 1 GiB artifact through the server, as a runner on another machine does it (its
JobStore: hash, then PUT to the server; GET, hashed and written, into a fresh blob cache and tree), against
`curl` of the same file from `python -m http.server` on the same machine, written to a file as ours are. Cases
alternate round by round (curl, upload, download; then upload, download, curl; ...) after one round that is not
counted; medians and the
ratios of the medians. Target: < 1.5x curl each. The upload includes hashing the file (what saving does first).
Also the CPU seconds each case cost the client and its server (curl and http.server for the baseline), which
other load on the machine moves less than wall time.

    .venv/bin/python bench/artifact_transfer.py [--size-mib 1024] [--rounds 5]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _common import DSTACK, PYTHON, env_for, print_table, stats, verdict, write_results  # noqa: E402

from dstack.runner.client import ServerClient  # noqa: E402
from dstack.runner.transfer import Transfers  # noqa: E402
from dstack.storage.cache import BlobCache  # noqa: E402
from dstack.storage.save import save_tree  # noqa: E402
from dstack.storage.tree import remove_tree, tree_cache  # noqa: E402

WORKFLOWS = """\
workflows:
  - name: prepare
    commands: [make]
    artifacts: [data]
  - name: train
    commands: [train]
    dependencies: [prepare]
    artifacts: [data]
"""
TARGET = 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.1)


def _cpu(server: int) -> float:
    """CPU seconds used so far by this process, its finished children (curl) and the server process `server`."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + (int(fields[11]) + int(fields[12])) / ticks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="dstack-bench-transfer-"))
    home = work / "home"
    procs: list[subprocess.Popen] = []
    try:
        data = work / "data"
        data.mkdir()
        with open(data / "big.bin", "wb") as f:
            for _ in range(size // (64 << 20)):
                f.write(os.urandom(64 << 20))
            f.write(os.urandom(size % (64 << 20)))
        # the baseline: a plain HTTP server of the same file, on the same machine
        http_port = free_port()
        procs.append(subprocess.Popen([PYTHON, "-m", "http.server", "-b", "127.0.0.1", str(http_port)], cwd=data,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{http_port}/", procs[-1])
        # the server, no local runners; a runner token; a job that has a dependency and saves artifacts
        env = {**env_for(home), "DSTACK_MAX_LOCAL_RUNNERS": "0", "DSTACK_RUNNER_TIMEOUT": "3600"}
        procs.append(subprocess.Popen([DSTACK, "server", "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        info = home / "server" / "server.json"
        while not info.exists():
            time.sleep(0.1)
        url = json.loads(info.read_text())["url"]
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {(home / 'server' / 'token').read_text()}"},
                             timeout=60)
        token = admin.post("/api/runners/tokens", json={"name": "bench"}).json()["token"]
        runner = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        runner.post("/api/runners/register", json={"hostname": "bench", "resources": {"cpus": 1, "memory_mib": 1}})
        transfers = Transfers(ServerClient(url, token), presigned=False)

        def job(workflow: str) -> str:
            admin.post("/api/runs", json={"repo_id": "bench", "workflow": workflow,
                                          "files": {".dstack/workflows.yaml": WORKFLOWS}}).raise_for_status()
            return runner.post("/api/runners/bench/take", params={"wait": 10}).json()["job_id"]

        prepare = job("prepare")
        manifest = save_tree(transfers.for_job("bench", prepare), data)
        runner.post(f"/api/runners/bench/jobs/{prepare}/status", json={
            "status": "DONE", "exit_code": 0,
            "artifacts": [{"path": "data", "manifest": manifest.digest(), "files": 1, "size": size}]}
        ).raise_for_status()
        train = job("train")
        blob = next(e.hash for e in manifest.entries if e.kind == "file")
        stored = home / "storage" / "blobs" / blob[:2] / blob

        def curl() -> None:
            subprocess.run(["curl", "-sf", "-o", str(work / "curl.bin"), f"http://127.0.0.1:{http_port}/big.bin"],
                           check=True)
            (work / "curl.bin").unlink()

        def upload() -> None:
            stored.unlink()  # the server has it no more: all of it goes up
            store = transfers.for_job("bench", train)
            save_tree(store, data)
            assert store.stats.uploaded_bytes == size

        def download() -> None:
            store = transfers.for_job("bench", train)
            tree = tree_cache(store, manifest.digest(), work / "trees", BlobCache(work / "cache"))
            assert store.stats.downloaded_bytes == size
            remove_tree(tree)
            shutil.rmtree(work / "cache")

        cases = {"curl": curl, "upload": upload, "download": download}
        servers = {"curl": procs[0].pid, "upload": procs[1].pid, "download": procs[1].pid}
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}  # seconds of CPU: the client's and its server's
        for fn in cases.values():  # a round not counted: the VM's memory touched once (see bench/README.md)
            fn()
        load_before = os.getloadavg()
        names = list(cases)
        for i in range(args.rounds):  # each case in each position in turn: what a case leaves (dirty pages in
            for name in names[i % 3:] + names[:i % 3]:  # writeback) weighs on each of the others alike
                fn = cases[name]
                c0 = _cpu(servers[name])
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(_cpu(servers[name]) - c0)
        base, base_cpu = statistics.median(times["curl"]), statistics.median(cpu["curl"])
        rows, results = [], {}
        for name, xs in times.items():
            s = stats(xs)
            ratio = s["median"] / base
            c = statistics.median(cpu[name])
            results[name] = {**s, "ratio_to_curl": round(ratio, 3), "mib_per_s": round(args.size_mib / s["median"]),
                             "cpu_seconds": stats(cpu[name]), "cpu_ratio_to_curl": round(c / base_cpu, 3)}
            rows.append({"case": name, "median": f"{s['median']:.2f} s", "p25": f"{s['p25']:.2f} s",
                         "p75": f"{s['p75']:.2f} s", "MiB/s": results[name]["mib_per_s"], "ratio": f"{ratio:.2f}x",
                         "target": "" if name == "curl" else f"< {TARGET}x {verdict(ratio, TARGET)}",
                         "CPU": f"{c:.2f} s ({c / base_cpu:.2f}x)"})
        print_table(rows, ["case", "median", "p25", "p75", "MiB/s", "ratio", "target", "CPU"])
        write_results("artifact_transfer", {"size_mib": args.size_mib, "rounds": args.rounds,
                                             "loadavg_before": load_before, "cases": results, "target": TARGET})
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

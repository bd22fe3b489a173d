"""Multi-node runs (issue 14, point 5): `nodes: N` places N jobs at once, each told its rank and where the
master is; the jobs reach each other over TCP; when one fails, the others are stopped, saying which failed."""

from __future__ import annotations

import re

from dstack.server.services.gangs import master_port

PAIR = """\
import os, socket, time
rank, port, master = int(os.environ["RANK"]), int(os.environ["MASTER_PORT"]), os.environ["MASTER_ADDR"]
if rank == 0:
    with socket.create_server(("0.0.0.0", port)) as server:
        conn, _ = server.accept()
        with conn:
            print("master got:", conn.recv(100).decode(), flush=True)
            conn.sendall(b"hello from rank 0")
else:
    deadline = time.time() + 30
    while True:
        try:
            conn = socket.create_connection((master, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        conn.sendall(f"hello from rank {rank}".encode())
        print("worker got:", conn.recv(100).decode(), flush=True)
"""


def test_a_two_node_run_whose_jobs_reach_each_other(dstack, project):
    root = project("""\
    workflows:
      - name: pair
        nodes: 2
        commands:
          - echo "rank=$JOB_RANK/$JOBS_COUNT rank=$RANK node=$NODE_RANK world=$WORLD_SIZE"
          - echo "master=$MASTER_JOB_HOSTNAME:$MASTER_JOB_PORT addr=$MASTER_ADDR:$MASTER_PORT me=$JOB_HOSTNAME"
          - python3 pair.py
      - name: half-broken
        nodes: 2
        commands:
          - if [ "$JOB_RANK" = 1 ]; then echo rank 1 fails; exit 3; fi
          - sleep 60
    """)
    (root / "pair.py").write_text(PAIR)
    r = dstack("run", "pair", cwd=root, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "master got: hello from rank 1" in r.stdout and "worker got: hello from rank 0" in r.stdout, r.stdout
    assert "rank=0/2 rank=0 node=0 world=2" in r.stdout and "rank=1/2 rank=1 node=1 world=2" in r.stdout
    port = re.search(r"master=127\.0\.0\.1:(\d+) addr=127\.0\.0\.1:(\d+) me=127\.0\.0\.1", r.stdout)
    assert port and port.group(1) == port.group(2), r.stdout
    run = dstack.runs(root)[0]
    assert run["status"] == "DONE" and len(run["jobs"]) == 2
    assert re.search(rf"{run['run_name']} rank 0 DONE in .*\n{run['run_name']} rank 1 DONE in ", r.stderr), r.stderr
    master = next(j for j in dstack.run_info(root, run["run_name"])["jobs"] if j["spec"]["rank"] == 0)
    assert int(port.group(1)) != master_port(master["job_id"])  # picked free by the master's runner, not derived

    broken = dstack("run", "half-broken", cwd=root, timeout=120)
    assert broken.returncode == 3, broken.stdout + broken.stderr
    info = dstack.run_info(root, dstack.runs(root)[0]["run_name"])
    statuses = sorted(j["status"] for j in info["jobs"])
    assert statuses == ["FAILED", "STOPPED"], info
    failed = next(j for j in info["jobs"] if j["status"] == "FAILED")
    stopped = next(j for j in info["jobs"] if j["status"] == "STOPPED")
    assert stopped["reason"] == f"stopped: job {failed['job_id']} (rank 1) of this 2-node run failed", stopped


def test_a_run_of_more_nodes_than_could_ever_run_at_once_is_refused(dstack, project):
    """Its jobs start together or not at all: more than all the runners and backends here could hold at once
    would wait forever, so it is refused at submission, pointing at `nodes`."""
    root = project("""\
    workflows:
      - name: huge
        nodes: 64
        resources: {cpu: 1, memory: 8GB}
        commands: [echo never]
    """)
    r = dstack("run", "huge", cwd=root)
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(r"\.dstack/workflows\.yaml:3:\d+: error: 'huge' asks for 64 nodes, and the runners and "
                     r"backends here can hold \d+ of its jobs at once \(.+\); a multi-node run starts all its jobs "
                     r"together or none", r.stderr), r.stderr
    assert "hint: ask for `nodes: " in r.stderr and "Traceback" not in r.stderr
    assert not [x for x in dstack.runs(root) if x["workflow"] == "huge"]

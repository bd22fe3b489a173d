"""Folders outside the job's working dir: absolute artifacts (saved from where the job wrote them, mounted at that
path for the workflows that depend on them), dependencies mounted `into` a folder, and `cache:` folders kept
between runs of a workflow on the same runner: on the host (a root runner: the job's own mount namespace) and in a
container."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dstack.core.models import DependencyRef, JobSpec
from dstack.runner import workspace
from dstack.runner.job_user import JobUser
from tests.e2e.conftest import last_run

WORKFLOWS = """\
workflows:
  - name: env
    {image}
    commands:
      - mkdir -p {env}/bin
      - echo "$RUN_NAME" > {env}/bin/made-by
      - mkdir -p logs && echo one > logs/events
    artifacts: [{env}, logs]
  - name: use
    {image}
    deps: [env]
    commands:
      - cat {env}/bin/made-by
      - touch {env}/bin/x 2>/dev/null && echo writable || echo read-only
  - name: side-by-side
    {image}
    dependencies:
      - {{workflow: env, into: runs/first}}
    commands:
      - cat runs/first/logs/events runs/first{env}/bin/made-by
  - name: fails
    {image}
    commands: [exit 3]
    artifacts: [{env}]
  - name: kept
    {image}
    cache: [~/.cache/counter, build, {{path: {kept}}}]
    commands:
      - for d in ~/.cache/counter build {kept}; do echo x >> $d/count; wc -l < $d/count; done
"""


@pytest.fixture
def machine():
    """A folder of the machine's that every user may pass through (as /opt is), for the jobs' absolute paths."""
    folder = Path(tempfile.mkdtemp(prefix="dstack-abs-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("where", ["host", "docker"])
def test_absolute_artifacts_into_and_cache(dstack, project, tmp_path, machine, where, request):
    image = f"image: {request.getfixturevalue('busybox_image')}" if where == "docker" else ""
    # absolute paths of the job's, which the machine's own folders must not see
    env, kept = machine / "opt" / "envs" / "train", machine / "kept"
    root = project(WORKFLOWS.format(image=image, env=env, kept=kept))

    r = dstack("run", "env", cwd=root, check=True)
    made = last_run(dstack, root)["run_name"]
    listed = json.loads(dstack("artifacts", "list", made, "--json", cwd=root, check=True).stdout)
    assert sorted(a["path"] for a in listed) == sorted([str(env), "logs"]), (listed, r.stdout)
    # the job wrote in a folder of its own, mounted there: nothing of it is left on the machine, nor the folders
    # made to mount on
    assert not (machine / "opt").exists()

    r = dstack("run", "use", cwd=root, check=True)
    assert r.stdout.split()[:2] == [made, "read-only"], r.stdout + r.stderr

    r = dstack("run", "side-by-side", cwd=root, check=True)
    assert r.stdout.split()[:2] == ["one", made], r.stdout + r.stderr

    out = tmp_path / "dl"
    dstack("artifacts", "download", made, "-o", str(out), cwd=root, check=True)
    assert (out / str(env).lstrip("/") / "bin" / "made-by").read_text() == f"{made}\n"

    r = dstack("run", "fails", cwd=root)
    assert r.returncode == 3 and f"artifact '{env}' was not created by the job: nothing saved" in r.stdout, r.stdout
    failed = last_run(dstack, root)["run_name"]
    assert json.loads(dstack("artifacts", "list", failed, "--json", cwd=root).stdout or "[]") == []

    counts = [dstack("run", "kept", cwd=root, check=True).stdout.split()[:3] for _ in range(2)]
    assert counts == [["1", "1", "1"], ["2", "2", "2"]], counts
    assert not (kept / "count").exists()  # kept in the runner's folder, not the machine's


def test_kept_folders_without_a_namespace(tmp_path):
    """A runner whose jobs run as itself with no mount namespace (not root): an absolute artifact is saved from the
    path itself and an absolute or `~/` cache folder is the path itself; one that runs jobs as other users with no
    namespace refuses them, saying what to do; an absolute dependency needs a namespace or an image."""
    job = JobSpec(workflow="w", provider="bash", artifacts=["/opt/envs/x", "out"], repo_id="r",
                  cache=["~/.cache/pip", "/var/cache/x", "build"])
    folder = tmp_path / "job"
    mounts, sources = workspace.output_mounts(job, folder, binds=False, user=None)
    assert (mounts, sources) == ([], {"/opt/envs/x": Path("/opt/envs/x")})
    mounts, locks, notes = workspace.cache_mounts(job, folder, tmp_path / "caches", binds=False, user=None)
    assert [m.target for m in mounts] == ["build"] and len(locks) == 1 and not notes
    # a second job of the workflow while the first holds its folder: an empty one of its own
    again, more, notes = workspace.cache_mounts(job, tmp_path / "job2", tmp_path / "caches", binds=False, user=None)
    assert again[0].source != mounts[0].source and not more and "in use by another job" in notes[0]
    for lock in locks:
        lock.close()

    other = JobUser(name="dstack-job", uid=os.getuid() + 1900000000, gid=os.getgid() + 1900000000, groups=(),
                    own=True)
    with pytest.raises(workspace.WorkspaceError, match="artifact '/opt/envs/x' is absolute.*give the workflow an `image`"):
        workspace.output_mounts(job, folder, binds=False, user=other)
    with pytest.raises(workspace.WorkspaceError, match="cache '/var/cache/x' is absolute"):
        workspace.cache_mounts(job, folder, tmp_path / "caches", binds=False, user=other)

    dep = DependencyRef(ref="env", run_name="r-1", job_id="j", artifacts=["/opt/envs/x"], manifests={"/opt/envs/x": "0"})
    job = JobSpec(workflow="use", provider="bash", dependencies=[dep])
    (tmp_path / "code").mkdir()
    with pytest.raises(workspace.WorkspaceError, match="mounted at its absolute path.*`image`, or run the runner as root"):
        workspace.dependency_mounts(job, tmp_path / "code", None, tmp_path / "trees", None, binds=False)


def test_kept_folders_are_links_on_a_host_without_a_namespace(tmp_path):
    """The host executor with no namespace: a kept folder in the job's folder or home is a symlink to it (what the
    job left at that path goes first); one elsewhere cannot be had, said."""
    from dstack.runner.executors.base import ExecutorError, Mount
    from dstack.runner.executors.host import _link_kept

    root, home, kept = tmp_path / "code", tmp_path / "home", tmp_path / "kept"
    for folder in (root / "build", home, kept):
        folder.mkdir(parents=True)
    (root / "build" / "stale").write_text("x")
    _link_kept(root, str(home), [Mount(kept, "build", read_only=False), Mount(kept, "~/.cache/pip", read_only=False)],
               None)
    assert os.readlink(root / "build") == str(kept) and os.readlink(home / ".cache" / "pip") == str(kept)
    with pytest.raises(ExecutorError, match="cannot mount /opt/x on this runner's host"):
        _link_kept(root, str(home), [Mount(kept, "/opt/x", read_only=False)], None)


def test_what_a_job_on_the_host_is_given_cannot_raise_it(dstack, project, machine):
    """On a root runner's host, a job's own mounts are nosuid and nodev and the job cannot gain privileges (a setuid
    program in a folder of its own, or one it mounts over /etc, would make it root); no folder of the machine's is
    made outside the places for them; a link of the code cannot lead a cache out of the job's folder; a path that
    is both a dependency's artifact and the job's own is refused."""
    root = project(f"""\
    workflows:
      - name: privs
        cache: [build]
        commands:
          - grep NoNewPrivs /proc/self/status
          - grep " $PWD/build " /proc/self/mountinfo
      - name: nologin
        commands: [echo never]
        artifacts: [/var/dstack-test-no-such-folder/nologin]
      - name: out-by-link
        cache: [lnk/y]
        commands: [echo never]
      - name: env
        commands: [mkdir -p {machine}/env && echo made > {machine}/env/x]
        artifacts: [{machine}/env]
      - name: over
        deps: [env]
        commands: [echo never]
        artifacts: [{machine}/env]
    """)
    (root / "lnk").symlink_to("/etc")
    r = dstack("run", "privs", cwd=root, check=True)
    line = next(x for x in r.stdout.splitlines() if "/build " in x)
    assert "NoNewPrivs:\t1" in r.stdout and "nosuid" in line and "nodev" in line, r.stdout

    r = dstack("run", "nologin", cwd=root)
    assert r.returncode != 0 and "folders to mount on are made only in /opt" in r.stdout + r.stderr, r.stdout
    assert not Path("/var/dstack-test-no-such-folder").exists()

    r = dstack("run", "out-by-link", cwd=root)
    assert r.returncode != 0 and "leads outside the job's folder" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not Path("/etc/y").exists()

    dstack("run", "env", cwd=root, check=True)
    r = dstack("run", "over", cwd=root)
    assert r.returncode != 0 and f"two folders would be mounted at '{machine}/env'" in r.stdout + r.stderr, r.stdout


def test_one_folder_one_use_and_tensorboard_runs_once():
    from pydantic import ValidationError

    from dstack.providers.base import CommandsSpec
    from dstack.providers.tensorboard import TensorboardSpec

    with pytest.raises(ValidationError, match="'out' is both an artifact and a cache"):
        CommandsSpec.model_validate({"name": "a", "commands": ["x"], "artifacts": ["out"], "cache": "./out"})
    with pytest.raises(ValidationError, match="run 'a' is listed twice"):
        TensorboardSpec.model_validate({"name": "b", "runs": ["a", "a"]})
    spec = TensorboardSpec.model_validate({"name": "b", "runs": ["a:b", "a-b", ":best"]})
    assert [d["into"] for d in spec.dependencies] == ["runs/a@b", "runs/a-b", "runs/@best"]
    with pytest.raises(ValidationError, match="`runs` names no run"):
        TensorboardSpec.model_validate({"name": "b", "runs": []})


def test_tensorboard_says_which_run_lacks_its_logdir(tmp_path):
    """The job's first lines, run as the job runs them: a run whose artifacts have no `logdir` is named, with what
    it saved; `logdir` may be an absolute artifact's path."""
    from dstack.providers.tensorboard import TensorboardProvider, TensorboardSpec
    from dstack.runner.executors.base import job_script

    spec = TensorboardSpec.model_validate({"name": "b", "runs": ["train-1", "train:best"], "logdir": "/opt/tb"})
    job = TensorboardProvider().create_jobs(spec, {})[0]
    (tmp_path / "runs" / "train-1" / "opt" / "tb").mkdir(parents=True)
    (tmp_path / "runs" / "train@best" / "logs").mkdir(parents=True)
    checks = job_script([c for c in job.commands if c.startswith("[ -e")])
    r = subprocess.run(["bash", "-c", checks], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "dstack: run train:best saved no 'opt/tb' (its artifacts: logs )\n", r


def test_an_image_of_another_user_writes_its_kept_folders(dstack, project, busybox_image, docker_client):
    """An image whose USER is not root (a uid with no account) writes its `~/` cache and its absolute artifact."""
    import io

    dockerfile = f"FROM {busybox_image}\nUSER 4321\n".encode()
    docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag="dstack-test/busybox-uid:latest", pull=False,
                               rm=True)
    root = project("""\
    workflows:
      - name: as-uid
        image: dstack-test/busybox-uid:latest
        cache: [~/.cache/c]
        commands:
          - id -u && echo $HOME
          - echo x >> ~/.cache/c/n && wc -l < ~/.cache/c/n
          - mkdir -p /opt/out/sub && echo hi > /opt/out/sub/f
        artifacts: [/opt/out]
    """)
    outs = [dstack("run", "as-uid", cwd=root, check=True).stdout.split()[:3] for _ in range(2)]
    assert outs == [["4321", "/home/4321", "1"], ["4321", "/home/4321", "2"]], outs
    listed = json.loads(dstack("artifacts", "list", last_run(dstack, root)["run_name"], "--json", cwd=root,
                               check=True).stdout)
    assert [(a["path"], a["files"]) for a in listed] == [("/opt/out", 1)]

"""Fixtures shared by every test: the real Docker Engine, a locally built busybox image, and a
fresh DSTACK_HOME per test. Nothing is pulled from a registry; nothing is mocked."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import settings

# property tests: no per-example deadline (CI machines stall), fewer examples by default;
# HYPOTHESIS_PROFILE=thorough for a longer search
settings.register_profile("dstack", deadline=None, max_examples=50)
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dstack"))

BUSYBOX_IMAGE = "dstack-test/busybox:latest"
HOST_BUSYBOX = Path("/bin/busybox")

_DOCKERFILE = b"""\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
"""


@pytest.fixture(scope="session", autouse=True)
def jobs_base():
    """The folder where runners that the tests start as root make the folders of their jobs (run as users of their
    own: runner/job_user.py; DSTACK_JOBS_DIR reaches local runners through their server's environment): one of the
    session's own, removed at its end, so that runners the tests kill leave nothing in /var/lib/dstack-runner."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dstack-jobs-"))
    folder.chmod(0o711)
    before = os.environ.get("DSTACK_JOBS_DIR")
    os.environ["DSTACK_JOBS_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("DSTACK_JOBS_DIR", None)
    else:
        os.environ["DSTACK_JOBS_DIR"] = before
    from dstack.storage.tree import remove_tree

    remove_tree(folder)


@pytest.fixture
def shared():
    """A folder that jobs may read and write whatever user they run as: a root runner runs each host job as a user
    of its own (runner/job_user.py), who cannot enter pytest's folders (0700). For the files a test and its jobs pass."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dstack-shared-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_client():
    """A Docker SDK client to the real engine; fails (never skips) when the engine is unreachable."""
    import docker  # imported here so that unit tests do not pay for it

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # the SDK raises several kinds; any of them means "no engine"
        pytest.fail(
            f"Docker Engine is not reachable ({e}). Start it with scripts/test.sh, which starts "
            "dockerd in the background (log: /tmp/dockerd.log), or run `dockerd &` as root.",
            pytrace=False,
        )
    yield client
    client.close()


def _build_context() -> io.BytesIO:
    """A tar build context holding the Dockerfile and the host's static busybox."""
    if not HOST_BUSYBOX.is_file():
        pytest.fail(
            f"{HOST_BUSYBOX} is missing; install it with `apt-get install busybox-static` "
            "(scripts/test.sh does this)",
            pytrace=False,
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(_DOCKERFILE)
        tar.addfile(info, io.BytesIO(_DOCKERFILE))
        tar.add(str(HOST_BUSYBOX), arcname="busybox")
    buf.seek(0)
    return buf


@pytest.fixture(scope="session")
def busybox_image(docker_client) -> str:
    """`dstack-test/busybox:latest`, built from scratch and the host's busybox; reused when present."""
    import docker

    try:
        docker_client.images.get(BUSYBOX_IMAGE)
        return BUSYBOX_IMAGE
    except docker.errors.ImageNotFound:
        pass
    try:
        docker_client.images.build(
            fileobj=_build_context(), custom_context=True, tag=BUSYBOX_IMAGE, pull=False, rm=True
        )
    except docker.errors.BuildError as e:
        log = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in e.build_log)
        pytest.fail(f"building {BUSYBOX_IMAGE} failed: {e}\n{log}", pytrace=False)
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def postgres():
    """The session's own PostgreSQL cluster (tests/postgres.py), started when a test first asks for it, stopped
    and removed at the session's end; fails (never skips) when PostgreSQL is not installed."""
    from tests.postgres import Cluster

    try:
        cluster = Cluster.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """The server's database, once SQLite (a file of the test's own) and once PostgreSQL (a database of the
    test's own in the session's cluster): an async SQLAlchemy URL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'dstack.db'}"
    return request.getfixturevalue("postgres").database()


@pytest.fixture
def dstack_home(tmp_path_factory, monkeypatch) -> Path:
    """A fresh, empty DSTACK_HOME for one test."""
    home = tmp_path_factory.mktemp("dstack-home")
    monkeypatch.setenv("DSTACK_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)

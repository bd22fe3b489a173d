"""The image of the `docker` backend's runners, built on the Docker Engine from what this machine has: nothing is
pulled from a registry (none need be reachable).

- `dstack/python-base:3.11-<hash>`: this machine's own Debian Python 3.11 (the files that `dpkg -L` lists for it
  and for the libraries it loads) and busybox (a shell and the usual tools), imported as one layer (54 MB, under
  a second). <hash> covers the packages' versions and busybox's bytes: an upgrade of the host makes a new one.
- `dstack/runner:<dstack version>-<wheelhouse key>`: FROM that base, dstack installed into /opt/dstack by pip
  (run from its own wheel) out of the server's wheelhouse (`backends/wheelhouse.py`), `--no-index`; ENTRYPOINT
  dstack-runner. Built once per version and wheelhouse (its labels say which); a second call is a lookup.

The host needs Debian 12's python3.11 (/usr/bin/python3.11) and a static busybox (/bin/busybox: `apt-get install
busybox-static`); the server must run Python 3.11 too, since the wheelhouse's binary wheels are its interpreter's.
Builds run with network_mode host: an engine without the docker0 bridge cannot start a bridged build step.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from dstack import __version__
from dstack.backends.base import BackendError

BASE_REPO, RUNNER_REPO = "dstack/python-base", "dstack/runner"
PYTHON = "3.11"
RECIPE = "1"  # part of the base's hash: a change of how it is made makes a new one
BUSYBOX = Path("/bin/busybox")
PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3-minimal", "python3",
            "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libssl3", "libffi8", "libsqlite3-0",
            "libbz2-1.0", "liblzma5", "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1",
            "libdb5.3", "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0",
            "libcom-err2", "libkeyutils1", "media-types", "tzdata", "ca-certificates", "netbase")
SKIPPED = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/lintian/", "/usr/share/locale/")
EXTRA = ("/etc/ssl/certs/ca-certificates.crt",)  # made by update-ca-certificates, listed by no package
# Applets left out: what a container may not do (no CAP_SYS_ADMIN: no namespaces, no mounts), so that no runner
# or job that finds them tries.
NO_APPLETS = frozenset({"unshare", "nsenter", "mount", "umount"})
USRMERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
ETC = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
       "etc/group": "root:x:0:\nnogroup:x:65534:\n"}
FOLDERS = {"tmp": 0o1777, "var/tmp": 0o1777, "root": 0o700, "run": 0o755, "var/lib": 0o755, "opt": 0o755}
DOCKERFILE = """\
FROM {base}
COPY wheels/ /tmp/wheels/
RUN python3 -m venv --without-pip /opt/dstack \\
 && /opt/dstack/bin/python /tmp/wheels/{pip}/pip install -q --no-index --no-cache-dir --disable-pip-version-check \\
    --find-links /tmp/wheels /tmp/wheels/{dstack} \\
 && rm -rf /tmp/wheels
ENV PATH=/opt/dstack/bin:/usr/bin:/bin
ENTRYPOINT ["dstack-runner"]
"""

_lock = threading.Lock()  # one build at a time in this process


def ensure(client, wheelhouse: Path) -> str:
    """The runner image's tag, built now if the engine lacks it (and the base under it)."""
    with _lock:
        return _runner(client, Path(wheelhouse), _base(client))


def find(client) -> str | None:
    """A runner image of this dstack version that the engine has (of any wheelhouse), or None."""
    images = client.images.list(name=RUNNER_REPO, filters={"label": f"dstack.version={__version__}"})
    tags = sorted(t for image in images for t in image.tags if t.startswith(f"{RUNNER_REPO}:"))
    return tags[-1] if tags else None


def runner_tag(wheelhouse: Path) -> str:
    """`dstack/runner:0.5.0-<key>`: the wheelhouse folder's name is its key (version first)."""
    key = Path(wheelhouse).name.removeprefix(f"{__version__}-")
    return f"{RUNNER_REPO}:{_tag_text(__version__)}-{_tag_text(key)}"


def _runner(client, wheelhouse: Path, base: str) -> str:
    import docker.errors

    tag = runner_tag(wheelhouse)
    labels = {"dstack.version": __version__, "dstack.wheelhouse": wheelhouse.name, "dstack.base": base}
    if _has(client, tag, labels):
        return tag
    if sys.version_info[:2] != (3, 11):
        raise BackendError(f"the runner image runs this machine's Python {PYTHON}, but the server's wheels are for "
                           f"Python {sys.version_info.major}.{sys.version_info.minor}: run the server with "
                           f"Python {PYTHON}")
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    pip = next((w for w in wheels if w.startswith("pip-")), None)
    dstack = next((w for w in wheels if w.startswith("dstack-")), None)
    if pip is None or dstack is None:
        raise BackendError(f"the wheelhouse {wheelhouse} lacks pip's or dstack's wheel")
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        _add_bytes(tar, "Dockerfile", DOCKERFILE.format(base=base, pip=pip, dstack=dstack).encode())
        for name in wheels:
            tar.add(wheelhouse / name, arcname=f"wheels/{name}")
    context.seek(0)
    try:
        client.images.build(fileobj=context, custom_context=True, tag=tag, pull=False, rm=True, forcerm=True,
                            network_mode="host", labels=labels)
    except docker.errors.BuildError as e:
        lines = [str(c.get("stream") or c.get("error") or "").strip() for c in e.build_log]
        tail = "\n".join(x for x in lines if x)[-1500:]
        raise BackendError(f"building {tag} failed: {e}\n{tail}") from None
    except docker.errors.APIError as e:
        raise BackendError(f"building {tag} failed: {e.explanation or e}") from None
    _prune(client, keep=tag)
    return tag


def _prune(client, keep: str) -> None:
    """The runner images of this version from other wheelhouses (an editable dstack's earlier code) that no
    container uses (the engine refuses to remove those)."""
    import docker.errors

    for image in client.images.list(name=RUNNER_REPO, filters={"label": f"dstack.version={__version__}"}):
        for tag in image.tags:
            if tag != keep:
                try:
                    client.images.remove(tag)
                except docker.errors.APIError:
                    pass


def _base(client) -> str:
    if not BUSYBOX.is_file() or not Path(f"/usr/bin/python{PYTHON}").is_file():
        raise BackendError(f"the runner image is built from this machine's Debian python{PYTHON} and {BUSYBOX}: "
                           f"apt-get install python{PYTHON} busybox-static")
    versions = _dpkg(["dpkg-query", "-W", "-f", "${Package}=${Version}\n", *PACKAGES])
    h = hashlib.sha256(f"{RECIPE}\n{versions}\n{sorted(NO_APPLETS)}\n".encode())
    h.update(BUSYBOX.read_bytes())
    tag = f"{BASE_REPO}:{PYTHON}-{h.hexdigest()[:12]}"
    if _has(client, tag, {}):
        return tag
    with tempfile.TemporaryDirectory(prefix="dstack-base-") as tmp:
        path = Path(tmp) / "root.tar"
        _root_tar(path, [line for line in _dpkg(["dpkg", "-L", *PACKAGES]).splitlines() if line.startswith("/")])
        out = client.api.import_image_from_file(
            str(path), repository=BASE_REPO, tag=tag.split(":", 1)[1],
            changes=["ENV PATH=/usr/bin:/bin", "ENV LANG=C.UTF-8", f"LABEL dstack.base={tag}"])
    if not _has(client, tag, {}):
        raise BackendError(f"importing {tag} failed: {_last_error(out)}")
    return tag


def _root_tar(dest: Path, listed: list[str]) -> None:
    """A root file system: the listed files of this machine (at their paths behind the usrmerge links), busybox
    with its applets, a minimal /etc, and the usual empty folders."""
    with tarfile.open(dest, "w") as tar:
        added: set[str] = set()

        def add(path: str, arcname: str) -> None:
            if arcname in added or not arcname:
                return
            add_parents(arcname)
            info = tar.gettarinfo(path, arcname)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)
            added.add(arcname)

        def add_parents(arcname: str) -> None:
            parent = os.path.dirname(arcname)
            if parent and parent not in added:
                add("/" + parent, parent)

        for name, target in USRMERGE.items():
            add_parents(target + "/")
            _add_link(tar, name, target)
            added.add(name)
        for path in [*listed, *EXTRA]:
            real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            if real.startswith(SKIPPED) or not os.path.lexists(real):
                continue
            add(real, real.lstrip("/"))
        add(str(BUSYBOX.resolve()), "usr/bin/busybox")
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
        for applet in sorted(set(applets.split()) - NO_APPLETS):
            if f"usr/bin/{applet}" not in added and f"usr/sbin/{applet}" not in added:
                _add_link(tar, f"usr/bin/{applet}", "busybox")
                added.add(f"usr/bin/{applet}")
        for name, text in ETC.items():
            _add_bytes(tar, name, text.encode())
        for name, mode in FOLDERS.items():
            if name not in added:
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    tar.addfile(info)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _has(client, tag: str, labels: dict[str, str]) -> bool:
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    have = image.labels or {}
    return all(have.get(k) == v for k, v in labels.items())


def _dpkg(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise BackendError(f"the runner image's base is made of this machine's Debian packages, but "
                           f"{' '.join(argv[:2])} failed: {str(detail).strip()[:300]}") from None


def _last_error(out) -> str:
    for line in reversed(str(out).splitlines()):
        try:
            error = json.loads(line).get("error")
        except (ValueError, AttributeError):
            continue
        if error:
            return error
    return str(out)[-300:]


def _tag_text(text: str) -> str:
    """A tag may hold letters, digits, `_`, `.` and `-` (a version's `+local` part may not stay as it is)."""
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in text)[:60]

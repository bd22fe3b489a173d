"""The server's own dstack as wheels, for the runners that backends start on other machines (which often reach no
package registry): `ensure(folder)` repacks the installed distributions (no network, no pip download) into a
folder that `pip install --no-index --find-links FOLDER dstack` installs from, pip's own wheel included (a venv
made `--without-pip` runs it as `python pip-X.whl/pip install ...`).

What it holds: dstack (the installed version; from an editable install, its package folder as it is now) and every
distribution of its runtime requirements' closure, markers evaluated for this interpreter, extras followed only
where a requirement names them (`sqlalchemy[asyncio]` brings greenlet; dstack's own `test` extra is not followed).
Each wheel is the installed distribution's files per its RECORD (no scripts or data outside site-packages, no
bytecode; pip writes console scripts again from entry_points.txt), its dist-info (METADATA, entry_points.txt, the
installed WHEEL with its tags) and a fresh RECORD. Wheels are deterministic (sorted, 1980 timestamps): the same
files make the same bytes, so a wheel's sha256 names its content.

Binary wheels are this interpreter's (cp311 here): a machine runs them with the same Python minor version and CPU.

The folder is `folder/<key>/` with `index.json` ([{"file", "sha256", "size"}]); the key changes with dstack's
version, the distributions' names and versions, and dstack's source files. It is built in a temporary folder and
renamed into place, so a reader never sees half of it and a second call costs only the key's computation."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

INDEX = "index.json"
FORMAT = "1"  # part of the key: a change of how wheels are made makes new ones
EPOCH = (1980, 1, 1, 0, 0, 0)
_NOT_COPIED = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}  # what an installer wrote, not the wheel
_COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".whl", ".png", ".jpg")  # stored as they are: deflate gains nothing


class WheelhouseError(Exception):
    """This environment cannot be repacked (no pip, a requirement not installed, a distribution without RECORD)."""


def ensure(folder: Path) -> Path:
    """The folder of wheels for this environment's dstack, built once per key; the same path on every call."""
    dists = closure()
    key = cache_key(dists)
    target = Path(folder) / key
    if (target / INDEX).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # zlib and hashing free the GIL
            index = list(pool.map(lambda d: repack(d, tmp), dists))
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / INDEX).is_file():  # not another process that built the same key first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(target.parent, keep=key)
    return target


_served: dict[Path, str | None] = {}


def served_wheel(home: Path) -> str | None:
    """`dstack_wheel(home)`, asked once per process (None when there is no wheelhouse: the bootstrap script then
    checks the venv with Python, as on a fresh machine)."""
    if home not in _served:
        try:
            _served[home] = dstack_wheel(home)
        except (WheelhouseError, OSError, StopIteration) as e:
            import logging

            logging.getLogger("dstack.server").warning("the wheelhouse: %s", e)
            _served[home] = None
    return _served[home]


def dstack_wheel(home: Path) -> str:
    """"FILE SHA256" of the dstack wheel the server of DSTACK_HOME `home` serves (built if it is not): what the
    bootstrap script writes into a venv it installs, and finds there at a later start."""
    folder = ensure(home / "server" / "wheels")
    entry = next(e for e in json.loads((folder / INDEX).read_text()) if e["file"].startswith("dstack-"))
    return f"{entry['file']} {entry['sha256']}"


def closure() -> list[metadata.Distribution]:
    """dstack, the installed distributions its runtime requirements need (this interpreter's markers), and pip."""
    Requirement = _requirement_class()
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements were followed
    todo: list[tuple[str, str, str]] = [("dstack", "", "the server"), ("pip", "", "the wheelhouse")]
    while todo:
        name, extra, wanted_by = todo.pop()
        key = _normalise(name)
        if (key, extra) in done:
            continue
        done.add((key, extra))
        if key not in found:
            try:
                found[key] = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                raise WheelhouseError(f"{name} (needed by {wanted_by}) is not installed: the wheelhouse repacks what "
                                      "is installed") from None
        for text in found[key].requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            todo.extend((req.name, e, name) for e in ("", *sorted(req.extras)))
    return [found[k] for k in sorted(found)]


def cache_key(dists: list[metadata.Distribution]) -> str:
    h = hashlib.sha256(FORMAT.encode())
    for dist in dists:
        h.update(f"{_normalise(dist.metadata['Name'])}=={dist.version}\n".encode())
        if _editable(dist):  # the same version with other code: a key of its own (by the files' sizes and
            for name, path in _package_files(dist):  # times: asked at every runner's start, read at none)
                st = path.stat()
                h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{metadata.version('dstack')}-{h.hexdigest()[:16]}"


def repack(dist: metadata.Distribution, out: Path) -> dict:
    """The installed distribution as a wheel in `out`: its index entry {"file", "sha256", "size"}."""
    name, version = dist.metadata["Name"], dist.version
    files = _installed_files(dist)
    info = next((n.split("/")[0] for n, _ in files if n.split("/")[0].endswith(".dist-info")), None)
    wheel_meta = next((p for n, p in files if n == f"{info}/WHEEL"), None)
    if info is None or wheel_meta is None:
        raise WheelhouseError(f"{name} {version} has no WHEEL in its dist-info: reinstall it with pip")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.read_text().splitlines() if line.startswith("Tag:")]
    wheel = out / f"{_normalise(name).replace('-', '_')}-{version.replace('-', '_')}-{_compress(tags)}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(wheel, "w") as zf:
        # the dist-info last, RECORD at its very end (as the wheel spec recommends)
        for arcname, path in sorted(files, key=lambda f: (f[0].startswith(info + "/"), f[0])):
            data = path.read_bytes()
            entry = zipfile.ZipInfo(arcname, EPOCH)
            entry.external_attr = ((path.stat().st_mode & 0o777) | 0o100000) << 16
            entry.compress_type = zipfile.ZIP_STORED if arcname.endswith(_COMPRESSED) else zipfile.ZIP_DEFLATED
            zf.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([arcname, f"sha256={digest}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        entry = zipfile.ZipInfo(f"{info}/RECORD", EPOCH)
        entry.external_attr = 0o100644 << 16
        zf.writestr(entry, record.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    return {"file": wheel.name, "sha256": _sha256(wheel), "size": wheel.stat().st_size}


def _installed_files(dist: metadata.Distribution) -> list[tuple[str, Path]]:
    """(name in the wheel, file on disk): what RECORD lists inside site-packages, less bytecode and what an
    installer wrote; an editable install's dist-info and package folders."""
    if dist.files is None:
        raise WheelhouseError(f"{dist.metadata['Name']} {dist.version} has no RECORD (not installed by pip): "
                              "reinstall it with pip")
    editable = _editable(dist)
    out = []
    for rel in dist.files:
        parts = rel.parts
        if not parts or parts[0] == ".." or "__pycache__" in parts or rel.suffix == ".pyc":
            continue  # console scripts and data outside site-packages; bytecode
        in_info = parts[0].endswith(".dist-info")
        if (in_info and len(parts) == 2 and parts[1] in _NOT_COPIED) or (editable and not in_info):
            continue
        path = Path(dist.locate_file(rel))
        if path.is_file():
            out.append(("/".join(parts), path))
    return out + (_package_files(dist) if editable else [])


def _package_files(dist: metadata.Distribution) -> list[tuple[str, Path]]:
    """An editable install's packages (top_level.txt, else the distribution's name), as their folders are now."""
    import importlib.util

    out = []
    for top in (dist.read_text("top_level.txt") or _normalise(dist.metadata["Name"])).split():
        spec = importlib.util.find_spec(top.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise WheelhouseError(f"the editable {dist.metadata['Name']}'s package {top} is not found")
        root = Path(list(spec.submodule_search_locations)[0])
        for here, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for n in sorted(names):
                if not n.endswith(".pyc"):
                    path = Path(here, n)
                    out.append((f"{top}/{path.relative_to(root).as_posix()}", path))
    return out


def _editable(dist: metadata.Distribution) -> bool:
    try:
        return bool(json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable"))
    except ValueError:
        return False


def _compress(tags: list[str]) -> str:
    """`cp311-cp311-manylinux_2_17_x86_64` and `cp311-cp311-manylinux2014_x86_64` -> one compressed tag set."""
    if not tags:
        return "py3-none-any"
    parts = [t.split("-") for t in tags]
    return "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _prune(folder: Path, keep: str) -> None:
    """Builds of other keys (an older dstack), and half builds of a process that died an hour ago or more."""
    for item in folder.iterdir():
        stale = item.name.startswith(".build-") and item.stat().st_mtime < time.time() - 3600
        if item.name != keep and (stale or (item / INDEX).is_file()):
            shutil.rmtree(item, ignore_errors=True)


def _requirement_class():
    """packaging's Requirement (markers evaluated as pip would); pip's own copy when packaging is not installed
    (pip is, or there is no wheelhouse)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    return Requirement

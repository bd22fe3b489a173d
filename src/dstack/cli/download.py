"""Downloading artifacts: files verified by their hash, skipped when already right, resumed when cut."""

from __future__ import annotations

import os
from pathlib import Path

from blake3 import blake3

from dstack.api.client import Client
from dstack.core.errors import DstackError, NotFound
from dstack.core.manifest import Entry, validate_relative_path
from dstack.core.sizes import human_size, plural


def _hash(path: Path) -> str:
    h = blake3(max_threads=blake3.AUTO)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _selected(artifact: str, entries: list[Entry], only: str | None) -> list[Entry]:
    if only is None:
        return entries
    only, artifact = only.strip("/"), artifact.lstrip("/")
    if only == artifact:
        return entries
    if not only.startswith(artifact + "/"):
        return []
    inner = only[len(artifact) + 1:]
    return [e for e in entries if e.path == inner or e.path.startswith(inner + "/")]


def download_artifacts(client: Client, artifacts: list[dict], output: Path, only: str | None) -> None:
    from rich.progress import BarColumn, Progress

    plan: list[tuple[Path, Entry]] = []
    links: list[tuple[Path, Entry]] = []
    dirs: list[Path] = []
    entries = {a["manifest"]: client.manifest(a["manifest"]).entries for a in artifacts}
    for a in artifacts:
        # an absolute artifact (/opt/conda/envs/x) lands at OUTPUT/opt/conda/envs/x
        base = output / validate_relative_path(a["path"].lstrip("/"), "artifact path") if a["path"] != "." else output
        for e in _selected(a["path"], entries[a["manifest"]], only):
            dest = base / e.path
            if e.kind == "dir":
                dirs.append(dest)
            elif e.kind == "symlink":
                links.append((dest, e))
            else:
                plan.append((dest, e))
    if only is not None and not (plan or links or dirs):
        names = ", ".join(a["path"] for a in artifacts)
        raise NotFound(f"nothing at '{only}' in these artifacts", hint=_near(artifacts, entries, only) + names)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    todo = []
    for dest, e in plan:
        if dest.exists() and dest.stat().st_size == e.size and _hash(dest) == e.hash:
            continue  # already there
        todo.append((dest, e))
    total = sum(e.size for _, e in todo)
    with Progress("[progress.description]{task.description}", BarColumn(), *_size_columns(),
                  transient=False, disable=not todo) as progress:
        task = progress.add_task(plural(len(todo), "file"), total=total)
        for dest, e in todo:
            _fetch(client, dest, e, lambda n: progress.advance(task, n))
    for dest, e in links:
        if dest.is_symlink() and os.readlink(dest) == e.target:
            continue
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(e.target, dest)
    skipped = len(plan) - len(todo)
    print(f"{plural(len(plan), 'file')} in {output}" + (f" ({skipped} already there)" if skipped else ""))


def _near(artifacts: list[dict], entries: dict[str, list[Entry]], only: str) -> str:
    """`data/dataset.csv` for `dataset.csv`: PATH written without its artifact's folder (the first few that end
    so), as the start of the hint."""
    inner = only.strip("/")
    near = [f"{a['path']}/{e.path}" if a["path"] != "." else e.path for a in artifacts for e in entries[a["manifest"]]
            if e.path == inner or e.path.endswith("/" + inner)][:3]
    if not near:
        return "artifacts: "
    from dstack.core.names import printable

    quoted = " or ".join(f"'{printable(n)}'" for n in near)
    return f"did you mean {quoted}? PATH starts with the artifact's folder; artifacts: "


def _fetch(client: Client, dest: Path, e: Entry, advance) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".dstack-part")
    offset = part.stat().st_size if part.exists() else 0
    if offset > e.size:
        part.unlink()
        offset = 0
    advance(offset)
    if e.size:
        with open(part, "ab") as f:
            client.download_blob(e.hash, f, offset, advance)
    else:
        part.touch()
    if _hash(part) != e.hash:
        part.unlink()
        raise DstackError(f"{dest}: the downloaded content does not match its hash", hint="download again")
    os.chmod(part, e.mode)
    os.replace(part, dest)


def _size_columns() -> list:
    """Bytes done of the total, and the speed, written as every size dstack prints is (core.sizes)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Done(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{human_size(task.completed)}/{human_size(task.total or 0)}", style="progress.download")

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{human_size(speed)}/s" if speed else "?", style="progress.data.speed")

    return [Done(), Speed()]

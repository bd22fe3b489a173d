"""A project's artifact folders: artifact folders are outputs, never code. Code capture leaves out what git does
not track in them, so that a folder of a past run's artifacts (`dstack artifacts download`) neither travels
into the next run's artifact nor hides the dependency mounted there."""

from __future__ import annotations

import posixpath
from typing import Any

from dstack.config.files import ProjectFiles
from dstack.config.workflows import WorkflowEntry, load_workflows
from dstack.providers.base import relative_path


def artifact_folders(files: ProjectFiles, workflow: str | None = None) -> tuple[list[str], list[str]]:
    """The folders, relative to the project, that some workflow saves as an artifact or where it mounts a
    dependency's artifacts (a dependency on a workflow of the project without `artifacts:` mounts all of that
    workflow's); and those of them that `workflow` saves. Each is joined to its workflow's `working_dir`. Left
    out: paths with a variable (`$x`, `${{ x }}`: their value is the run's), paths that the run would refuse
    (absolute, leaving the folder), and a folder that is or holds a workflow's working folder (`artifacts: [.]`:
    it holds code)."""
    entries = load_workflows(files)
    own = {e.name: _paths(e.raw.get("artifacts")) for e in entries}
    workdirs = {e.name: _path(e.raw.get("working_dir") or ".") for e in entries}
    folders: set[str] = set()
    saved: set[str] = set()
    for entry in entries:
        workdir = workdirs[entry.name]
        if workdir is None:
            continue
        mine = _joined(workdir, own[entry.name])
        folders |= mine
        if entry.name == workflow:
            saved = mine
        for dep in _dependencies(entry):
            if isinstance(dep, dict) and dep.get("artifacts") is not None:
                folders |= _joined(workdir, _paths(dep["artifacts"]))
                continue
            ref = (dep.get("ref") or dep.get("workflow")) if isinstance(dep, dict) else dep
            if isinstance(ref, str):
                folders |= _joined(workdir, own.get(ref.strip().split(":")[0], []))
    code = {w for w in workdirs.values() if w is not None}
    folders = {f for f in folders if not any(w == f or w.startswith(f + "/") for w in code)}
    return sorted(folders), sorted(saved & folders)


def _dependencies(entry: WorkflowEntry) -> list:
    deps = next((entry.raw[k] for k in ("dependencies", "depends-on", "deps") if k in entry.raw), None)
    return [deps] if isinstance(deps, str | dict) else deps if isinstance(deps, list) else []


def _paths(items: Any) -> list[str]:
    """The paths of an `artifacts:` list (`data` or `{path: data}`; a dependency's may be one path)."""
    items = [items] if isinstance(items, str) else items if isinstance(items, list) else []
    found = (_path(item.get("path") if isinstance(item, dict) else item) for item in items)
    return [p for p in found if p is not None]


def _path(value: Any) -> str | None:
    if not isinstance(value, str) or "$" in value:
        return None
    try:
        return relative_path(value, "artifact")
    except ValueError:
        return None


def _joined(workdir: str, paths: list[str]) -> set[str]:
    return {posixpath.normpath(posixpath.join(workdir, p)) for p in paths}

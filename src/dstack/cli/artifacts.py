"""`dstack artifacts list|download|diff`: the saved outputs of runs."""

from __future__ import annotations

import click

from dstack.core.names import printable
from dstack.core.sizes import human_size

CTX = {"help_option_names": ["-h", "--help"]}


def _client_and_repo():
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id

    return connect(), repo_id(find_project())


def _artifacts(client, rid: str, ref: str) -> list[dict]:
    """The artifacts of the run or job `ref` (a name, a job id, or `WORKFLOW:TAG` as in `dependencies`); a run of
    another project is said to be one, as `status` and `logs` say it."""
    from dstack.cli.output import say_if_other_project
    from dstack.cli.refs import run_name

    name = run_name(client, rid, ref)
    say_if_other_project(client.run(rid, name), rid)
    return client.artifacts(rid, name)


@click.group(context_settings=CTX)
def artifacts() -> None:
    """The saved outputs (artifacts) of runs: list, download, compare. A run is its name, a job id, or its
    tag as `dependencies` write it: `dstack artifacts download prepare:latest`."""


@artifacts.command("list", context_settings=CTX)
@click.argument("run_or_job")
@click.option("--files", "show_files", is_flag=True, help="List every file of every artifact.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(run_or_job: str, show_files: bool, as_json: bool) -> None:
    """The artifacts of a run (or of one job; or WORKFLOW:TAG): path, files, size, manifest hash."""
    client, rid = _client_and_repo()
    found = _artifacts(client, rid, run_or_job)
    if as_json:
        import json

        if show_files:
            found = [{**a, "entries": client.manifest(a["manifest"]).model_dump()["entries"]} for a in found]
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    if not found:
        click.echo(f"{run_or_job} saved no artifacts.")
        return
    from dstack.cli.table import print_table

    print_table(("JOB", "ARTIFACT", "FILES", "SIZE", "HASH"),
                [(a["job_id"], a["path"], str(a["files"]), human_size(a["size"]), a["manifest"][:16]) for a in found])
    if show_files:
        for a in found:
            click.echo(f"\n{printable(a['path'])}/")
            for e in client.manifest(a["manifest"]).entries:
                if e.kind == "dir":
                    continue
                extra = (f"-> {printable(e.target)}" if e.kind == "symlink"
                         else f"{human_size(e.size):>10}  {oct(e.mode)[2:]}")
                click.echo(f"  {printable(e.path)}  {extra}")  # a job's file may have any name


@artifacts.command(context_settings=CTX)
@click.argument("run_or_job")
@click.argument("path", required=False)
@click.option("-o", "--output", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder to download into; each artifact lands at OUTPUT/<its path>.")
def download(run_or_job: str, path: str | None, output: str) -> None:
    """Download the artifacts of a run or job, or of WORKFLOW:TAG (or only PATH, an artifact or a file/folder
    in one).

    Files already there with the right content are skipped, and an interrupted download resumes.
    Downloading into the project is safe: artifact folders are outputs, never code. `dstack run` leaves
    out what git does not track in them, so downloaded files never reach the next run's artifacts, nor
    hide the dependencies mounted there."""
    from pathlib import Path

    from dstack.cli.download import download_artifacts

    client, rid = _client_and_repo()
    found = _artifacts(client, rid, run_or_job)
    if not found:
        raise click.ClickException(f"{run_or_job} saved no artifacts")
    download_artifacts(client, found, Path(output), path)


@artifacts.command(context_settings=CTX)
@click.argument("run_a")
@click.argument("run_b")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(run_a: str, run_b: str, as_json: bool) -> None:
    """What changed between the artifacts of RUN_A and RUN_B: files added, removed, changed."""
    client, rid = _client_and_repo()

    def files(run: str) -> dict[str, tuple]:
        out = {}
        for a in _artifacts(client, rid, run):
            for e in client.manifest(a["manifest"]).entries:
                if e.kind != "dir":
                    out[f"{a['path']}/{e.path}"] = (e.kind, e.hash or e.target, e.size, e.mode)
        return out

    a, b = files(run_a), files(run_b)
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed = sorted(p for p in set(a) & set(b) if a[p] != b[p])
    if as_json:
        import json

        click.echo(json.dumps({"added": added, "removed": removed, "changed": changed,
                               "unchanged": len(set(a) & set(b)) - len(changed)}, indent=2, ensure_ascii=False))
        return
    for p in added:
        click.echo(f"+ {printable(p)}  ({human_size(b[p][2])})")
    for p in removed:
        click.echo(f"- {printable(p)}  ({human_size(a[p][2])})")
    for p in changed:
        what = "mode" if a[p][:3] == b[p][:3] else f"{human_size(a[p][2])} -> {human_size(b[p][2])}"
        click.echo(f"M {printable(p)}  ({what})")
    same = len(set(a) & set(b)) - len(changed)
    click.echo(f"{len(added)} added, {len(removed)} removed, {len(changed)} changed, {same} unchanged")

"""A run named as `dependencies` name it: `WORKFLOW:TAG` (or `:TAG`) is the run that tag is on."""

from __future__ import annotations

from dstack.api.client import Client


def run_name(client: Client, repo_id: str, ref: str) -> str:
    """`ref` as the server knows it: a run name or job id stays as it is (neither holds a ':'); `prepare:latest`
    becomes the run of `prepare` tagged `latest`, `:v1` the run tagged `v1` whatever its workflow (as in
    `dependencies`). A tag that is on no run, or `:TAG` on runs of several workflows, is an error that says so."""
    if ":" not in ref:
        return ref
    from dstack.core.errors import Conflict, NotFound

    workflow, _, tag = ref.rpartition(":")
    tags = client.tags(repo_id)
    found = [t for t in tags if t.name == tag and (not workflow or t.workflow == workflow)]
    if len(found) > 1:
        names = ", ".join(f"{t.workflow}:{t.name}" for t in found)
        raise Conflict(f"tag '{tag}' is on runs of several workflows ({names})", hint="write WORKFLOW:TAG")
    if found:
        return found[0].run_name
    if not workflow:
        raise NotFound(f"no run is tagged '{tag}'", hint=_tags_hint(tags))
    own = sorted(f"{t.workflow}:{t.name}" for t in tags if t.workflow == workflow)
    hint = (f"tags of '{workflow}': {', '.join(own)}" if own
            else f"tag a run of '{workflow}' first: dstack tag RUN {tag}; {_tags_hint(tags)}")
    raise NotFound(f"no run of '{workflow}' is tagged '{tag}'", hint=hint)


def _tags_hint(tags: list) -> str:
    return "`dstack tags` lists this project's tags" if tags else "this project has no tags yet"

"""`.dstack/providers.yaml`: providers of a project's own, with no package (the 2022 form). Each is a name, an
image or none, commands, and the keys it accepts:

    providers:
      - name: greet
        help: Say hello to someone
        image: ubuntu:22.04          # optional: without one, the commands run on the runner's host
        keys: [who, times]           # what a workflow that uses it may set; `who: world` in the workflow
        commands:
          - for i in $(seq ${{ times }}); do echo "hello ${{ who }}"; done

A workflow `provider: greet` sets `who` and `times` (and every key of `bash`: env, artifacts, resources, ...); the
keys reach the commands as `${{ key }}` / `$key` and as environment variables (`$WHO`). A key that a workflow does
not set is an error naming it, unless the provider gives it a default (`keys: {who: world}`)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ConfigDict, Field, create_model, model_validator

from dstack.config.files import ProjectFiles
from dstack.config.yaml_positions import Located, load_text
from dstack.core.errors import did_you_mean
from dstack.core.models import JobSpec
from dstack.providers.base import CommandsProvider, CommandsSpec
from dstack.providers.python import _without_commands

PROVIDERS_FILE = ".dstack/providers.yaml"
_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
_OWN = ("name", "help", "image", "commands", "keys")


class _CustomSpec(CommandsSpec):
    """What every workflow of a providers.yaml provider has: the keys of `bash` (its own commands aside)."""

    model_config = ConfigDict(json_schema_extra=_without_commands)

    image: str | None = Field(None, description="An image to run the provider's commands in (else its own, or "
                                                "the runner's host).")

    @model_validator(mode="after")
    def _own_commands(self) -> _CustomSpec:
        if self.commands:
            raise ValueError(f"provider '{self.provider}' runs its own commands (.dstack/providers.yaml): a workflow "
                             "of it has no `commands`; commands to run first go in `before_run`")
        return self


def custom_provider(files: ProjectFiles, name: str) -> CommandsProvider | None:
    """The provider `name` of the project's providers.yaml, or None."""
    text = files.texts.get(PROVIDERS_FILE)
    if text is None:
        return None
    located = load_text(text, PROVIDERS_FILE)
    items = located.data.get("providers") if isinstance(located.data, dict) else None
    if not isinstance(items, list):
        raise located.error((), "providers.yaml has one key, 'providers': a list of {name, image, commands, keys}")
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == name:
            return _build(item, located, ("providers", i))
    return None


def custom_providers(files: ProjectFiles) -> list[CommandsProvider]:
    """Every provider of the project's providers.yaml (`dstack providers` lists them with the installed ones)."""
    text = files.texts.get(PROVIDERS_FILE)
    if text is None:
        return []
    located = load_text(text, PROVIDERS_FILE)
    items = located.data.get("providers") if isinstance(located.data, dict) else None
    return [p for i, item in enumerate(items if isinstance(items, list) else []) if isinstance(item, dict)
            and item.get("name") and (p := _build(item, located, ("providers", i))) is not None]


def _build(item: dict, located: Located, path: tuple) -> CommandsProvider:
    unknown = [k for k in item if k not in _OWN]
    if unknown:
        raise located.error(path + (unknown[0],), f"unknown key '{unknown[0]}' in provider '{item['name']}'",
                            hint=did_you_mean(str(unknown[0]), _OWN) or f"known keys: {', '.join(_OWN)}", key=True)
    commands = item.get("commands")
    commands = [commands] if isinstance(commands, str) else commands
    if not commands or not all(isinstance(c, str) for c in commands):
        raise located.error(path + ("commands",), f"provider '{item['name']}' needs `commands`: a list of lines")
    keys = item.get("keys") or []
    defaults = keys if isinstance(keys, dict) else {k: ... for k in keys} if isinstance(keys, list) else None
    if defaults is None:
        raise located.error(path + ("keys",), "`keys` is a list of names, or a mapping of names to defaults")
    for k in defaults:
        if not isinstance(k, str) or not _KEY.match(k) or k in CommandsSpec.model_fields:
            raise located.error(path + ("keys",), f"key {k!r} of provider '{item['name']}' is not a name of its own "
                                                  "(lower-case letters, digits, _; not a key every workflow has)")
    fields: dict[str, Any] = {k: (Any, Field(... if v is ... else v)) for k, v in defaults.items()}
    spec = create_model(f"{item['name']}Spec", __base__=_CustomSpec, **fields)
    spec.__doc__ = str(item.get("help") or f"The project's provider {item['name']} (.dstack/providers.yaml).")
    image = item.get("image")

    class Custom(CommandsProvider):
        name = str(item["name"])
        Spec = spec

        def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
            values = {k: getattr(spec, k) for k in defaults}
            lines = [_put(line, values) for line in commands]
            own_env = {k.upper(): "" if v is None else str(v) for k, v in values.items()}
            jobs = super().create_jobs(spec.model_copy(update={"commands": lines}), {**env, **own_env})
            for job in jobs:
                job.image = getattr(spec, "image", None) or image
            return jobs

    return Custom()


def _put(line: str, values: dict[str, Any]) -> str:
    """`${{ key }}` and `$key` of the provider's keys replaced by the workflow's values (other `$` left to the
    shell)."""
    def one(m: re.Match) -> str:
        key = m.group(1) or m.group(2)
        if key not in values:
            return m.group(0)
        value = values[key]
        return ("true" if value else "false") if isinstance(value, bool) else "" if value is None else str(value)

    return re.sub(r"\$\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}|\$([a-z_][a-z0-9_]*)\b", one, line)

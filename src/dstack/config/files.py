"""The texts of a project's `.dstack/*.yaml`, read where the user runs the CLI and resolved where the server
runs: what `dstack run` sends. Standard library only, so that reading them costs the CLI nothing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstack.core.errors import ConfigError

MAX_FILE = 1 << 20  # a workflows file of more than 1 MiB is a mistake (data written into .dstack/)
MAX_FILES = 256


@dataclass
class ProjectFiles:
    """`texts`: each file by its path relative to the project (`.dstack/workflows.yaml`), as it reads in
    messages. `root`: the project's folder as the user knows it, for messages only."""

    texts: dict[str, str] = field(default_factory=dict)
    root: str = "."

    @classmethod
    def read(cls, project: Path) -> ProjectFiles:
        folder = project / ".dstack"
        names = ["workflows.yaml", "workflows.yml", "variables.yaml", "providers.yaml"]
        texts = {}
        for path in [folder / n for n in names] + _folder_files(folder / "workflows"):
            rel = str(path.relative_to(project))
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_FILE + 1)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ConfigError(f"cannot read {rel}: {e.strerror}", file=rel) from None
            if len(data) > MAX_FILE:
                raise _too_large(rel)
            try:
                texts[rel] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{rel} is not UTF-8 text", file=rel) from None
        return cls(texts=texts, root=str(project))

    def check(self) -> None:
        """What a server asks of files that came over the network: `.dstack/` paths, within the limits."""
        if len(self.texts) > MAX_FILES:
            raise ConfigError(f"{len(self.texts)} files in .dstack/ is more than {MAX_FILES}")
        for rel, text in self.texts.items():
            if not rel.startswith(".dstack/"):
                raise ConfigError(f"'{rel}' is not a file of .dstack/", file=rel)
            if len(text) > MAX_FILE:
                raise _too_large(rel)

    def require_workflows(self) -> None:
        if not self.workflow_files():
            raise ConfigError(
                f"no workflows: {Path(self.root) / '.dstack' / 'workflows.yaml'} does not exist",
                hint="run `dstack init` to write an example, or cd into your project",
            )

    def workflow_files(self) -> list[str]:
        """`.dstack/workflows.yaml`, `.dstack/workflows.yml`, then `.dstack/workflows/*.yaml` by name."""
        top = [p for p in (".dstack/workflows.yaml", ".dstack/workflows.yml") if p in self.texts]
        return top + sorted(p for p in self.texts if p.startswith(".dstack/workflows/"))


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what bytes that were not UTF-8 (or half a "\\u" pair) become


def require_unicode(values: Any, what: str) -> None:
    """Text in `values` (strings, lists, dicts) that is not Unicode, such as a command-line argument whose bytes
    were not UTF-8, is refused: stored, it could not be shown back. (A YAML escape of half a character is
    refused where it is written, by the YAML loader.)"""
    for text in _strings(values):
        if LONE_SURROGATE.search(text):
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ConfigError(f"{what} '{shown}' is not UTF-8 text",
                              hint="pass the value in UTF-8 (check the terminal's or the script's encoding)")


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _too_large(rel: str) -> ConfigError:
    return ConfigError(f"{rel} is larger than {MAX_FILE >> 20} MiB", file=rel,
                       hint="workflows.yaml describes workflows; keep data in artifacts")


def _folder_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []

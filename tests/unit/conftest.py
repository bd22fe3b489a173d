"""Helpers for unit tests: a project folder with `.dstack/*.yaml` written from text."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dstack.config.files import ProjectFiles
from dstack.config.workflows import ResolvedWorkflow, resolve_workflow


class Project:
    def __init__(self, root: Path):
        self.root = root
        (root / ".dstack").mkdir()

    def write(self, relpath: str, text: str) -> Path:
        path = self.root / ".dstack" / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def workflows(self, text: str) -> Project:
        self.write("workflows.yaml", text)
        return self

    def variables(self, text: str) -> Project:
        self.write("variables.yaml", text)
        return self

    def files(self) -> ProjectFiles:
        return ProjectFiles.read(self.root)

    def resolve(self, name: str, overrides: dict | None = None, run_name: str = "lazy-bobcat-1") -> ResolvedWorkflow:
        return resolve_workflow(self.files(), name, overrides or {}, run_name)


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)

"""Providers turn a resolved workflow into job specs. Each validates its own keys."""

from __future__ import annotations

import argparse
import posixpath
from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dstack.core.errors import ConfigError, did_you_mean
from dstack.core.models import JobSpec, RetryPolicy
from dstack.core.resources import Requirements


def relative_path(value: str, what: str) -> str:
    """A path inside the job's folder: no absolute paths, no `..` that leaves it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty path")
    value = value.strip()
    if value.startswith(("/", "~")):
        within = "the project's folder" if what == "working_dir" else "the job's working_dir"
        raise ValueError(f"{what} '{value}' must be a path relative to {within}")
    norm = posixpath.normpath(value)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"{what} '{value}' leaves the job's folder")
    return norm


_NOT_FOLDERS = ("/proc", "/sys", "/dev", "/etc")  # nor anything in them
# the machine's (or image's) own folders, which a folder of the job's mounted there would hide from it
_SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/root", "/run",
                   "/sbin", "/srv", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local", "/var", "/var/lib", "/mnt")


def artifact_path(value: Any, what: str = "artifact") -> str:
    """An artifact's path: relative to the job's working_dir, or absolute (`/opt/conda/envs/x`: saved from where
    the job wrote it, mounted there for the workflows that depend on it)."""
    if isinstance(value, str) and value.strip().startswith("/"):
        norm = posixpath.normpath(value.strip()).replace("//", "/")
        if norm in _SYSTEM_FOLDERS or any(norm == d or norm.startswith(d + "/") for d in _NOT_FOLDERS):
            raise ValueError(f"{what} '{value.strip()}' is the machine's own: a folder of the job's mounted there "
                             "would hide what the machine (or the image) has in it; name a folder of the job's, "
                             "e.g. /opt/conda/envs/train")
        if norm == "/workflow" or norm.startswith("/workflow/"):
            raise ValueError(f"{what} '{value.strip()}': /workflow is where a container has the job's code; write "
                             "the path relative to the working_dir")
        return norm
    if isinstance(value, str) and value.strip().startswith("~"):
        raise ValueError(f"{what} '{value.strip()}': `~` is the job's home, which is not kept; use a path "
                         "relative to the working_dir or an absolute one (folders to keep between runs go in "
                         "`cache`)")
    return relative_path(value, what)


def _folders(v: Any, check: Callable[[Any], str]) -> Any:
    """A list of folders as written (`data` or `{path: data}`), each normalised by `check`, and each once (`data`
    and `./data` are one folder); None is none; anything else is left for the field's type to refuse."""
    if v is None:
        return []
    if not isinstance(v, list):
        return v
    return list(dict.fromkeys(check(item.get("path") if isinstance(item, dict) else item) for item in v))


def cache_path(value: Any) -> str:
    """A `cache:` folder: `~/.cache/pip` (the job's home), an absolute path, or one relative to the working_dir."""
    if isinstance(value, str) and value.strip().startswith("~"):
        text = value.strip()
        if not text.startswith("~/") or posixpath.normpath(text[2:]) in (".", "..") \
                or posixpath.normpath(text[2:]).startswith("../"):
            raise ValueError(f"cache '{text}' must be a folder in the job's home, e.g. ~/.cache/pip")
        return "~/" + posixpath.normpath(text[2:])
    return artifact_path(value, "cache")


class WorkflowSpec(BaseModel):
    """Keys every workflow has, whatever its provider."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    help: str | None = None
    provider: str | dict | None = None
    dependencies: list[str | dict] = Field(default_factory=list, alias="depends-on")

    @field_validator("dependencies", mode="before")
    @classmethod
    def _deps(cls, v: Any) -> Any:
        if isinstance(v, dict) and v and set(v) <= {"repo", "workflows"}:  # early 2022: {repo: {include}, workflows}
            v = v.get("workflows") or []  # the repo's files: every run has its code
        return [] if v is None else [v] if isinstance(v, str | dict) else v

    retry: RetryPolicy | None = None

    @field_validator("retry", mode="before")
    @classmethod
    def _retry(cls, v: Any) -> Any:
        """`retry: 2` is `{limit: 2}` (on a lost runner); `retry: true` is `{limit: 1}`; false or 0: none."""
        if v is None or v is False or v == 0:
            return None
        if v is True:
            return {"limit": 1}
        if isinstance(v, int):
            return {"limit": v}
        if isinstance(v, dict):
            if True in v and "on" not in v:  # YAML 1.1 reads the key `on` as the boolean true
                v = {("on" if k is True else k): x for k, x in v.items()}
            if isinstance(v.get("on"), str):
                v = {**v, "on": [v["on"]]}
        return v


class CommandsSpec(WorkflowSpec):
    """Keys of the workflows that run commands (bash, docker)."""

    commands: list[str] = []
    before_run: list[str] = Field(default_factory=list, alias="setup")
    environment: dict[str, str] = Field(default_factory=dict, alias="env")
    working_dir: str = "."
    ports: int = Field(0, ge=0, le=64)
    nodes: int = Field(1, ge=1, le=64)
    entrypoint: list[str] | None = None

    @field_validator("entrypoint", mode="before")
    @classmethod
    def _entrypoint(cls, v: Any) -> Any:
        """`entrypoint: /bin/bash -c` (shell words) or a list; it replaces the image's and gets the commands."""
        if isinstance(v, str):
            import shlex

            try:
                v = shlex.split(v)
            except ValueError as e:
                raise ValueError(f"entrypoint {v!r}: {e}") from None
        if isinstance(v, list) and not v:
            raise ValueError("entrypoint is a command: e.g. /bin/bash -c")
        return v

    @model_validator(mode="after")
    def _entrypoint_needs_image(self) -> CommandsSpec:
        if self.entrypoint and not getattr(self, "image", None) and not getattr(self, "docker", False):
            raise ValueError("`entrypoint` replaces an image's entrypoint: give the workflow an `image` (on the "
                             "runner's host, put the program in `commands`)")
        return self
    artifacts: list[str] = []
    cache: list[str] = []
    resources: Requirements = Requirements()

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v: Any) -> Any:
        """`cache: [~/.cache/pip, data/tmp]` (or `{path: ...}`): folders kept between runs of the workflow on the
        same runner; `~/` is the job's home, a relative path is in the working_dir."""
        return _folders([v] if isinstance(v, str | dict) else v, cache_path)

    @field_validator("cache")
    @classmethod
    def _one_use_a_folder(cls, v: list[str], info: ValidationInfo) -> list[str]:
        both = [p for p in v if p in (info.data.get("artifacts") or [])]
        if both:
            raise ValueError(f"'{both[0]}' is both an artifact and a cache: a folder is saved (`artifacts`) or "
                             "kept on the runner (`cache`), not both")
        return v

    @field_validator("commands", "before_run", mode="before")
    @classmethod
    def _lines(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            return [str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, int | float) else x
                    for x in v]
        return v

    @field_validator("environment", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, list):  # the 0.0.x form: ["KEY=VALUE", "KEY"]
            out = {}
            for item in v:
                if not isinstance(item, str):
                    raise ValueError("each entry must be KEY=VALUE")
                k, _, val = item.partition("=")
                out[k] = val
            return out
        if isinstance(v, dict):
            return {str(k): ("" if x is None else str(x).lower() if isinstance(x, bool) else str(x))
                    for k, x in v.items()}
        return v

    @field_validator("artifacts", mode="before")
    @classmethod
    def _artifacts(cls, v: Any) -> Any:
        return _folders(v, artifact_path)

    @field_validator("working_dir", mode="before")
    @classmethod
    def _wd(cls, v: Any) -> Any:
        return "." if v is None else relative_path(str(v), "working_dir")

    @field_validator("resources", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return {} if v is None else v


class Provider:
    """A workflow kind. Subclasses set `name` and `Spec` and implement `create_jobs`; `from_args` reads
    `dstack run PROVIDER ARGS` (no workflow) into a workflow's keys."""

    name: ClassVar[str]
    Spec: ClassVar[type[WorkflowSpec]]

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        raise NotImplementedError

    def from_args(self, args: list[str]) -> dict[str, Any]:
        """The keys of a workflow that `dstack run NAME ARGS` means, from the 2022 provider arguments every
        provider takes (`-e/--env`, `-a/--artifact`, `--dep`, `-w/--working-dir`, `-i/--interruptible`, `--cpu`,
        `--memory`, `--gpu`, `--gpu-name`, `--gpu-memory`, `--shm-size`, `-r/--requirements`), then `own_args`."""

        known = self._parser().parse_args(args)
        raw: dict[str, Any] = {"name": self.name, "provider": self.name}
        if known.env:
            raw["env"] = known.env
        if known.artifact:
            raw["artifacts"] = known.artifact
        if known.dep:
            raw["dependencies"] = known.dep
        if known.working_dir:
            raw["working_dir"] = known.working_dir
        if known.requirements:
            raw["requirements"] = known.requirements
        resources: dict[str, Any] = {k: v for k, v in (("cpu", known.cpu), ("memory", known.memory),
                                                       ("shm_size", known.shm_size)) if v is not None}
        gpu = {k: v for k, v in (("count", known.gpu), ("name", known.gpu_name), ("memory", known.gpu_memory))
               if v is not None}
        if gpu:
            resources["gpu"] = gpu
        if known.interruptible:
            resources["interruptible"] = True
        if resources:
            raw["resources"] = resources
        raw.update(self.own_keys(known))
        return raw

    def usage(self) -> str:
        """`dstack run NAME ARGS`'s usage line: the 2022 provider arguments and the provider's own."""
        return self._parser().format_usage().strip()

    def _parser(self) -> argparse.ArgumentParser:
        parser = _ArgParser(prog=f"dstack run {self.name}", add_help=False)
        parser.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
        parser.add_argument("-a", "--artifact", action="append", default=[], metavar="PATH")
        parser.add_argument("--dep", action="append", default=[], metavar="REF")
        parser.add_argument("-w", "--working-dir", metavar="PATH")
        parser.add_argument("-i", "--interruptible", action="store_true")
        parser.add_argument("-r", "--requirements", metavar="FILE")
        for key in ("--cpu", "--memory", "--gpu", "--gpu-name", "--gpu-memory", "--shm-size"):
            parser.add_argument(key, metavar=key.strip("-").split("-")[-1].upper())
        self.own_args(parser)
        return parser

    def own_args(self, parser: argparse.ArgumentParser) -> None:
        """The provider's own arguments of `dstack run NAME ARGS` (none here)."""

    def own_keys(self, known: argparse.Namespace) -> dict[str, Any]:
        """The workflow's keys from the provider's own arguments."""
        return {}


class _ArgParser(argparse.ArgumentParser):
    """argparse whose mistakes are ConfigErrors (said by `dstack run`, exit 2), not its own exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}", hint=f"`dstack run {self.prog.split()[-1]}` takes the "
                                                          "2022 provider arguments; `dstack providers` lists the keys")


class CommandsProvider(Provider):
    """One job that runs the workflow's commands, in its image if it has one."""

    def own_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-c", "--command", action="append", default=[])
        parser.add_argument("-p", "--ports", type=int)
        if self.name == "docker":
            parser.add_argument("image")

    def own_keys(self, known: argparse.Namespace) -> dict[str, Any]:
        out: dict[str, Any] = {"commands": known.command} if known.command else {}
        if known.ports is not None:
            out["ports"] = known.ports
        if getattr(known, "image", None):
            out["image"] = known.image
        return out

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        """One job; `nodes: N`, N alike (rank 0 the master), placed all at once (see server/services/gangs)."""
        return [
            JobSpec(
                workflow=spec.name,
                provider=self.name,
                image=getattr(spec, "image", None),
                commands=[*spec.before_run, *spec.commands],
                entrypoint=spec.entrypoint,
                env={**env, **spec.environment},
                working_dir=spec.working_dir,
                artifacts=spec.artifacts if rank == 0 else [],  # the master's artifacts are the run's
                cache=spec.cache,
                ports=spec.ports,
                requirements=spec.resources,
                retry=spec.retry,
                nodes=spec.nodes,
                rank=rank,
                master=rank == 0,
            )
            for rank in range(spec.nodes)
        ]


@cache
def providers() -> dict[str, type[Provider]]:
    """Providers registered through the entry-point group `dstack.providers`, built-in ones included."""
    found = {}
    for ep in entry_points(group="dstack.providers"):
        found[ep.name] = ep
    return found  # loaded lazily by get_provider


LEGACY = {"streamlit", "gradio", "fastapi", "curl"}


def get_provider(name: str) -> Provider:
    eps = providers()
    if name not in eps:
        hint = did_you_mean(name, eps) or f"known providers: {', '.join(sorted(eps))}"
        if name in LEGACY:
            hint = (f"the 2022 provider '{name}' is not built in: use `provider: bash` (or an `image:`) with "
                    f"`commands:` that run it, e.g. `python3 train.py`; {hint}")
        raise ConfigError(f"unknown provider '{name}'", hint=hint)
    return eps[name].load()()

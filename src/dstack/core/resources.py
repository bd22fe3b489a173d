"""Resources a job asks for and resources a runner has, and whether one fits the other."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from dstack.core.base import Model
from dstack.core.names import MAX_INT64

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|[KMGT])?\s*$", re.IGNORECASE)
_UNIT_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size_mib(value: Any) -> int:
    """'16GB' -> 16384, '512MB' -> 512, 2048 -> 2048 (a bare number is MiB). GB and GiB are both 1024 MiB."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 16GB, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a size such as 16GB, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 16GB, got {value!r}")
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a size; write it as e.g. 512MB or 16GB")
    number, unit = float(m.group(1)), (m.group(2) or "M")[0].upper()
    return int(number * _UNIT_MIB[unit])


def format_mib(mib: int) -> str:
    if mib >= 1024 and mib % 1024 == 0:
        return f"{mib // 1024}GB"
    if mib >= 1024:
        return f"{mib / 1024:.1f}GB"
    return f"{mib}MB"


class Gpu(Model):
    name: str = Field(max_length=200)
    memory_mib: int = Field(0, ge=0, le=MAX_INT64)


class GpuRequirement(Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    count: int = Field(1, ge=0)
    name: str | None = None
    memory_mib: int | None = Field(None, alias="memory", serialization_alias="memory_mib")  # API: in MiB

    @field_validator("memory_mib", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_size_mib(v)


class Requirements(Model):
    """The `resources:` of a workflow, normalised. Accepts the short form `<name>/gpu: N`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    cpu: int | None = Field(None, ge=1)
    memory_mib: int | None = Field(None, alias="memory", serialization_alias="memory_mib")  # API: in MiB
    gpu: GpuRequirement | None = None
    shm_size_mib: int | None = Field(None, alias="shm_size", serialization_alias="shm_size_mib")
    interruptible: bool = False
    local: bool = False

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in [k for k in data if isinstance(k, str) and k.endswith("/gpu")]:
            count = data.pop(key)
            if "gpu" in data:
                raise ValueError(f"'{key}' and 'gpu' both given; use one of them")
            data["gpu"] = {"name": key[: -len("/gpu")], "count": count}
        if isinstance(data.get("cpu"), dict):
            data["cpu"] = data["cpu"].get("count")
        gpu = data.get("gpu")
        if isinstance(gpu, bool):
            raise ValueError("gpu must be a count or {count, name, memory}")
        if isinstance(gpu, int):
            data["gpu"] = {"count": gpu}
        elif isinstance(gpu, str) and gpu.strip().isdigit():
            data["gpu"] = {"count": int(gpu)}
        return data

    @field_validator("memory_mib", "shm_size_mib", mode="before")
    @classmethod
    def _sizes(cls, v: Any) -> Any:
        return None if v is None else parse_size_mib(v)

    @property
    def gpu_count(self) -> int:
        return self.gpu.count if self.gpu else 0

    def describe(self) -> str:
        parts = []
        if self.cpu:
            parts.append(f"{self.cpu} CPU")
        if self.memory_mib:
            parts.append(f"{format_mib(self.memory_mib)} memory")
        if self.gpu_count:
            g = self.gpu
            name = f" {g.name}" if g.name else ""
            mem = f" ({format_mib(g.memory_mib)})" if g.memory_mib else ""
            parts.append(f"{g.count}{name} GPU{mem}")
        if self.shm_size_mib:
            parts.append(f"{format_mib(self.shm_size_mib)} shared memory")
        if self.interruptible:
            parts.append("interruptible")
        return ", ".join(parts) or "no specific resources"


class RunnerResources(Model):
    cpus: int = Field(ge=0, le=MAX_INT64)
    memory_mib: int = Field(ge=0, le=MAX_INT64)
    gpus: list[Gpu] = Field([], max_length=1024)
    docker: bool = False
    interruptible: bool = False

    def describe(self) -> str:
        gpus = f", {len(self.gpus)}x {self.gpus[0].name}" if self.gpus else ""
        return f"{self.cpus} CPU, {format_mib(self.memory_mib)}{gpus}{', docker' if self.docker else ''}"


def missing(req: Requirements, res: RunnerResources, needs_docker: bool) -> list[str]:
    """What `res` lacks to run a job with `req`; empty when it fits."""
    lacks = []
    if needs_docker and not res.docker:
        lacks.append("Docker (the workflow has an image)")
    if req.cpu and req.cpu > res.cpus:
        lacks.append(f"{req.cpu} CPUs (has {res.cpus})")
    if req.memory_mib and req.memory_mib > res.memory_mib:
        lacks.append(f"{format_mib(req.memory_mib)} memory (has {format_mib(res.memory_mib)})")
    if req.gpu_count:
        gpus = [
            g
            for g in res.gpus
            if (not req.gpu.name or req.gpu.name.lower() in g.name.lower())
            and (not req.gpu.memory_mib or g.memory_mib >= req.gpu.memory_mib)
        ]
        if len(gpus) < req.gpu_count:
            what = f"{req.gpu_count} {req.gpu.name + ' ' if req.gpu.name else ''}GPU"
            what += "s" if req.gpu_count > 1 else ""
            if req.gpu.memory_mib:
                what += f" with {format_mib(req.gpu.memory_mib)}"
            lacks.append(f"{what} (has {len(gpus)} matching)")
    if req.interruptible and not res.interruptible:
        pass  # an on-demand machine may run an interruptible job
    return lacks

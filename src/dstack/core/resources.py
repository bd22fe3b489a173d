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
    """16384 -> '16 GB', 24105 -> '23.5 GB': written as every size is (core.sizes.human_size), rounded down, so
    that a value read back (`memory: 23.5 GB`) is never more than there is."""
    if mib < 1024:
        return f"{mib} MB"
    if mib % 1024 == 0:
        return f"{mib // 1024} GB"
    return f"{math.floor(mib / 102.4) / 10:g} GB"


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
    labels: dict[str, str] = Field({}, max_length=50)  # a runner's labels that the job needs, each as given

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, dict):  # `gpu-type: 1` is the label's text "1"
            return {str(k): str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()}
        return v

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
            parts.append(f"{self.cpu} CPU{'' if self.cpu == 1 else 's'}")
        if self.memory_mib:
            parts.append(f"{format_mib(self.memory_mib)} memory")
        if self.gpu_count:
            g = self.gpu
            name = f" {g.name}" if g.name else ""
            mem = f" ({format_mib(g.memory_mib)})" if g.memory_mib else ""
            parts.append(f"{g.count}{name} GPU{'' if g.count == 1 else 's'}{mem}")
        if self.shm_size_mib:
            parts.append(f"{format_mib(self.shm_size_mib)} shared memory")
        if self.interruptible:
            parts.append("interruptible")
        if self.labels:
            parts.append("labels " + ",".join(f"{k}={v}" for k, v in self.labels.items()))
        return ", ".join(parts) or "no specific resources"


class RunnerResources(Model):
    cpus: int = Field(ge=0, le=MAX_INT64)
    memory_mib: int = Field(ge=0, le=MAX_INT64)
    gpus: list[Gpu] = Field([], max_length=1024)
    docker: bool = False
    interruptible: bool = False
    host_user: str | None = Field(None, max_length=200)  # whom a job without an image runs as on this machine
    address: str | None = Field(None, max_length=300)  # where other machines reach it (multi-node runs)

    def describe(self) -> str:
        gpus = f", {len(self.gpus)}x {self.gpus[0].name}" if self.gpus else ""
        cpus = f"{self.cpus} CPU{'' if self.cpus == 1 else 's'}"
        return f"{cpus}, {format_mib(self.memory_mib)}{gpus}{', docker' if self.docker else ''}"


def _matching_gpus(req: Requirements, res: RunnerResources) -> list[Gpu]:
    return [res.gpus[i] for i in matching_gpu_indexes(req, res.gpus)]


def matching_gpu_indexes(req: Requirements, gpus: list[Gpu]) -> list[int]:
    """The indexes (as NVML and nvidia-smi number them) of the GPUs of `gpus` that `req`'s GPU asks for."""
    if not req.gpu_count:
        return []
    return [i for i, g in enumerate(gpus)
            if (not req.gpu.name or req.gpu.name.lower() in g.name.lower())
            and (not req.gpu.memory_mib or g.memory_mib >= req.gpu.memory_mib)]


def visible_gpus_env(req: Requirements, gpus: list[Gpu], given: list[int] | None = None) -> dict[str, str]:
    """What a job without an image is told of the machine's GPUs: only those it was given (`given`, by the
    server; else the first that match) are visible to CUDA, numbered as nvidia-smi numbers them; none when it
    asked for none. Nothing on a machine without GPUs."""
    if not gpus:
        return {}
    chosen = given if given is not None else matching_gpu_indexes(req, gpus)[: req.gpu_count]
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, chosen))}


def most_offered(req: Requirements, offers: list[RunnerResources]) -> dict[str, Any]:
    """For each resource that `req` asks more of than any of `offers` has: the most that one has, which is what
    the workflow could ask instead. Keys: `gpu` (a count), `gpu.name` (the GPU models there are), `gpu.memory`,
    `cpu`, `memory` (MiB), `docker` (False)."""
    best: dict[str, Any] = {}
    if req.gpu_count:
        most = max((len(_matching_gpus(req, o)) for o in offers), default=0)
        if most < req.gpu_count:
            best["gpu"] = most
        models = sorted({g.name for o in offers for g in o.gpus})
        if req.gpu.name and not any(req.gpu.name.lower() in m.lower() for m in models):
            best["gpu.name"] = models
        memory = max((g.memory_mib for o in offers for g in o.gpus), default=0)
        if req.gpu.memory_mib and memory < req.gpu.memory_mib:
            best["gpu.memory"] = memory
    if req.cpu and (most := max((o.cpus for o in offers), default=0)) < req.cpu:
        best["cpu"] = most
    if req.memory_mib and (most := max((o.memory_mib for o in offers), default=0)) < req.memory_mib:
        best["memory"] = most
    return best


def missing(req: Requirements, res: RunnerResources, needs_docker: bool,
            labels: dict[str, str] | None = None) -> list[str]:
    """What `res` (a runner with `labels`) lacks to run a job with `req`; empty when it fits."""
    lacks = []
    if needs_docker and not res.docker:
        lacks.append("Docker (the workflow has an image)")
    if req.cpu and req.cpu > res.cpus:
        lacks.append(f"{req.cpu} CPU{'' if req.cpu == 1 else 's'} (has {res.cpus})")
    if req.memory_mib and req.memory_mib > res.memory_mib:
        lacks.append(f"{format_mib(req.memory_mib)} memory (has {format_mib(res.memory_mib)})")
    if req.gpu_count:
        gpus = _matching_gpus(req, res)
        if len(gpus) < req.gpu_count:
            what = f"{req.gpu_count} {req.gpu.name + ' ' if req.gpu.name else ''}GPU"
            what += "s" if req.gpu_count > 1 else ""
            if req.gpu.memory_mib:
                what += f" with {format_mib(req.gpu.memory_mib)}"
            lacks.append(f"{what} (has {len(gpus)} matching)")
    wrong = [f"{k}={v}" for k, v in req.labels.items() if (labels or {}).get(k) != v]
    if wrong:
        lacks.append(f"the label{'s' if len(wrong) > 1 else ''} {', '.join(wrong)}")
    if res.interruptible and not req.interruptible:
        lacks.append("a machine that is not interruptible (spot): the workflow does not say `interruptible: true`")
    return lacks  # an on-demand machine may run an interruptible job


class Usage:
    """What the jobs that run on a runner take of it: CPUs (a job that does not say takes one), memory (what
    the jobs asked for) and GPUs (by index)."""

    def __init__(self) -> None:
        self.cpus, self.memory_mib, self.gpus = 0, 0, set[int]()

    def add(self, req: Requirements, gpu_indexes: list[int] | None) -> None:
        self.cpus += req.cpu or 1
        self.memory_mib += req.memory_mib or 0
        self.gpus.update(gpu_indexes or [])

    def copy(self) -> Usage:
        other = Usage()
        other.cpus, other.memory_mib, other.gpus = self.cpus, self.memory_mib, set(self.gpus)
        return other

    def free(self, res: RunnerResources) -> RunnerResources:
        """What is left of `res`."""
        return res.model_copy(update={
            "cpus": max(0, res.cpus - self.cpus), "memory_mib": max(0, res.memory_mib - self.memory_mib),
            "gpus": [g for i, g in enumerate(res.gpus) if i not in self.gpus]})


def place(req: Requirements, res: RunnerResources, used: Usage) -> list[int] | None:
    """Whether a job that asks for `req` fits now on a runner that has `res`, of which `used` is taken: the
    indexes of the GPUs it gets (the first free ones that match; [] when it asks for none), or None when it does
    not fit now. A GPU is never given to two jobs."""
    if used.cpus + (req.cpu or 1) > max(res.cpus, 1):
        return None
    if req.memory_mib and used.memory_mib + req.memory_mib > res.memory_mib:
        return None
    if not req.gpu_count:
        return []
    free = [i for i in matching_gpu_indexes(req, res.gpus) if i not in used.gpus]
    return free[: req.gpu_count] if len(free) >= req.gpu_count else None

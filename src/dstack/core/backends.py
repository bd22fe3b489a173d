"""What the API says of backends and their limits (`dstack backends`, `dstack limits`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

BACKEND_NAME = re.compile(r"[a-z][a-z0-9-]{0,48}")
SPOT = ("spot", "on-demand", "either")


class Limits(BaseModel):
    """What a backend may create: every limit holds at all times, also under many submissions at once."""

    model_config = {"extra": "forbid"}

    enabled: bool = True
    regions: list[str] = Field(default_factory=list, max_length=100)  # empty: any
    instance_types: list[str] = Field(default_factory=list, max_length=1000)  # empty: any
    spot: Literal["spot", "on-demand", "either"] = "either"
    max_total: int | None = Field(None, ge=0, le=100_000)  # instances at once
    max_per_type: dict[str, int] = Field(default_factory=dict)  # instance type -> instances at once
    max_price: float | None = Field(None, ge=0)  # USD an hour, per instance
    idle_timeout: float | None = Field(None, ge=0, le=7 * 24 * 3600)  # seconds; None: the server's default

    @field_validator("max_per_type")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in v.items():
            if n < 0:
                raise ValueError(f"the most instances of {k} cannot be negative")
        return v

    def refusal(self, instance_type: str | None, region: str | None, spot: bool, price: float) -> str | None:
        """Why these limits do not allow such an instance at all (None: they do, counts aside)."""
        if not self.enabled:
            return "the backend is disabled"
        if self.regions and region is not None and region not in self.regions:
            return f"region {region} is not allowed ({', '.join(self.regions)})"
        if self.instance_types and instance_type is not None and instance_type not in self.instance_types:
            return f"{instance_type} is not among the allowed instance types"
        if self.spot == "spot" and not spot:
            return "only spot instances are allowed"
        if self.spot == "on-demand" and spot:
            return "only on-demand instances are allowed"
        if self.max_price is not None and price > self.max_price:
            return f"${price:.2f}/h is over the price cap of ${self.max_price:.2f}/h"
        return None

    def describe(self) -> str:
        parts = [] if self.enabled else ["disabled"]
        if self.regions:
            parts.append("regions " + ",".join(self.regions))
        if self.instance_types:
            parts.append("types " + ",".join(self.instance_types))
        if self.spot != "either":
            parts.append(self.spot)
        if self.max_total is not None:
            parts.append(f"at most {self.max_total}")
        parts += [f"at most {n} {t}" for t, n in self.max_per_type.items()]
        if self.max_price is not None:
            parts.append(f"≤ ${self.max_price:.2f}/h")
        if self.idle_timeout is not None:
            parts.append(f"idle {self.idle_timeout:g}s")
        return ", ".join(parts) or "none"


class BackendRequest(BaseModel):
    """`dstack backends add` / `test`: a backend of kind `kind` (an installed plug-in), and its settings,
    credentials included (kept encrypted; never returned)."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=49)
    kind: str = Field(min_length=1, max_length=50)
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not BACKEND_NAME.fullmatch(v):
            raise ValueError("a backend's name is lower-case letters, digits and '-', starting with a letter")
        return v


class BackendInfo(BaseModel):
    name: str
    kind: str
    settings: dict[str, Any]  # without the secrets
    secrets: list[str] = Field(default_factory=list)  # the names of the credentials it holds (never their values)
    limits: Limits = Field(default_factory=Limits)
    instances: int = 0  # alive now
    created_at: datetime | None = None
    configured: bool = True  # False: built in (local), not added
    note: str | None = None  # what `test` found, or why it cannot be used


class InstanceInfo(BaseModel):
    backend: str
    instance_id: str
    runner_name: str
    instance_type: str | None = None
    region: str | None = None
    spot: bool = False
    price: float = 0.0
    status: str
    created_at: datetime
    terminated_at: datetime | None = None
    reason: str | None = None

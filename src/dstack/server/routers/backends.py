"""Backends, their limits and the instances they created (the admin's: `dstack backends`, `dstack limits`; a web
Settings page would use the same). No answer ever holds a backend's credentials. The rules are in
services/backends.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Path

from dstack.core.backends import BackendInfo, BackendRequest, InstanceInfo, Limits
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx
from dstack.server.services import backends

router = APIRouter(prefix="/api", tags=["backends"])

Name = Path(max_length=50)


@router.get("/backend-kinds")
async def backend_kinds() -> list[dict]:
    """The kinds of backend that installed packages provide, with their settings (and which are credentials)."""
    return await backends.kinds()


@router.get("/backends")
async def list_backends(ctx: Context = Depends(get_ctx)) -> list[BackendInfo]:
    return await backends.list_backends(ctx)


@router.post("/backends")
async def add_backend(req: BackendRequest, ctx: Context = Depends(get_ctx)) -> BackendInfo:
    """Checked against its provider first; its credentials are stored encrypted and never returned."""
    return await backends.add(ctx, req)


@router.post("/backends/test")
async def test_settings(req: BackendRequest, ctx: Context = Depends(get_ctx)) -> BackendInfo:
    """Check settings against the provider without storing them."""
    return await backends.test(ctx, req=req)


@router.post("/backends/{name}/test")
async def test_backend(name: str = Name, ctx: Context = Depends(get_ctx)) -> BackendInfo:
    return await backends.test(ctx, name=name)


@router.delete("/backends/{name}")
async def remove_backend(name: str = Name, ctx: Context = Depends(get_ctx)) -> BackendInfo:
    """Forget it; its instances are terminated (busy ones once their jobs end)."""
    return await backends.remove(ctx, name)


@router.get("/limits")
async def list_limits(ctx: Context = Depends(get_ctx)) -> dict[str, Limits]:
    return {b.name: b.limits for b in await backends.list_backends(ctx)}


@router.patch("/limits/{name}")
async def set_limits(name: str = Name, changes: dict[str, Any] = Body(...),
                     ctx: Context = Depends(get_ctx)) -> Limits:
    """Change the limits named in the body; the others stay."""
    return await backends.set_limits(ctx, name, changes)


@router.delete("/limits/{name}")
async def remove_limits(name: str = Name, ctx: Context = Depends(get_ctx)) -> Limits:
    """Back to no limits (the backend enabled)."""
    return await backends.remove_limits(ctx, name)


@router.get("/instances")
async def list_instances(all: bool = False, ctx: Context = Depends(get_ctx)) -> list[InstanceInfo]:
    return await backends.list_instances(ctx, include_gone=all)

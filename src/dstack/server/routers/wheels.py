"""The server's own dstack as wheels (backends/wheelhouse.py), which the runners that backends start on other
machines install from (backends/bootstrap.py): the index, and each wheel. The admin's token and runners' tokens
may read them. Built in a thread at the first request (a few seconds), once: concurrent first requests wait for
the same build."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from dstack.backends import wheelhouse
from dstack.core.errors import NotFound, Unavailable
from dstack.server.context import Context
from dstack.server.routers.deps import RUNNER_API, get_ctx

router = APIRouter(prefix="/api/wheels", tags=["wheels", RUNNER_API])


async def _wheels(request: Request, ctx: Context) -> tuple[Path, dict[str, dict]]:
    """(the wheelhouse's folder, its index by file name), built at the first call."""
    state = request.app.state
    if getattr(state, "wheels", None) is None:
        if getattr(state, "wheels_lock", None) is None:
            state.wheels_lock = asyncio.Lock()
        async with state.wheels_lock:
            if getattr(state, "wheels", None) is None:
                try:
                    folder = await asyncio.to_thread(wheelhouse.ensure, ctx.settings.home / "server" / "wheels")
                except wheelhouse.WheelhouseError as e:
                    raise Unavailable(f"the server cannot serve its wheels: {e}",
                                      hint="on the server's machine, in dstack's environment") from None
                index = json.loads((folder / wheelhouse.INDEX).read_text())
                state.wheels = (folder, {e["file"]: e for e in index})
    return state.wheels


@router.get("")
async def index(request: Request, ctx: Context = Depends(get_ctx)) -> list[dict]:
    """[{"file", "sha256", "size"}]: every wheel that `pip install --no-index dstack` needs, pip's own included."""
    return list((await _wheels(request, ctx))[1].values())


@router.get("/{file}")
async def wheel(request: Request, file: str, ctx: Context = Depends(get_ctx)) -> FileResponse:
    folder, entries = await _wheels(request, ctx)
    if file not in entries:  # only names of the index: nothing else of the folder, nor beyond it
        raise NotFound(f"no wheel {file} on this server", hint="GET /api/wheels lists them")
    return FileResponse(folder / file, media_type="application/octet-stream")

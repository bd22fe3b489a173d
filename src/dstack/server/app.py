"""The FastAPI application: routers, error handling, start-up (migrations, backends, background loops)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError

from dstack import __version__
from dstack.backends.registry import backend_class
from dstack.core.errors import DstackError
from dstack.server.background.loops import run_loops
from dstack.server.context import Context, Settings
from dstack.server.db.session import make_engine, make_sessionmaker, migrate
from dstack.server.routers import artifacts, code, runners, runs, tags, transfers, wheels
from dstack.server.routers import backends as backend_routes
from dstack.server.routers.deps import RUNNER_API, authorized
from dstack.server.services import autoscaler
from dstack.server.services import backends as backend_service
from dstack.server.services import runners as runner_service
from dstack.server.services.code import CodeBlobs
from dstack.server.services.disk import disk_full, is_disk_full
from dstack.server.services.jobs import ensure_dirs
from dstack.server.services.secrets import Sealer, server_id
from dstack.storage.blobstore import open_store

log = logging.getLogger("dstack.server")


def create_app(settings: Settings, on_ready=None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(migrate, settings.db_url)
        engine = make_engine(settings.db_url)
        local = backend_class("local")(settings.runners_dir, settings.max_local_runners, spares=True)  # a plug-in
        ctx = Context(settings=settings, sessions=make_sessionmaker(engine), store=open_store(settings.store_config),
                      code=CodeBlobs(settings.home / "server" / "code"), backends=[local],
                      sealer=Sealer(settings.home / "server"), server_id=server_id(settings.home / "server"))
        ensure_dirs(ctx)
        ctx.code.remove_partial()  # this server holds the DSTACK_HOME's lock: no other one uploads now
        app.state.ctx = ctx
        # runners that outlived a previous server process (local ones that still run, self-hosted ones) go on
        await runner_service.server_started(ctx, {i.runner_name for i in local.list()})
        await backend_service.load(ctx)  # the configured backends, and every backend's limits
        await autoscaler.reconcile(ctx, force=True)  # what each backend has now, orphans included
        loops = asyncio.create_task(run_loops(ctx))
        if on_ready:
            on_ready()
        try:
            yield
        finally:
            ctx.stop()  # long polls still open answer now
            loops.cancel()
            # the local runners stop with the server: their unfinished jobs are lost, and say why
            names = [i.runner_name for i in local.list()]
            await runner_service.fail_jobs_of(ctx, names, "the local server was stopped while the job ran")
            await asyncio.to_thread(local.shutdown)
            await backend_service.close_all(ctx)
            await runner_service.terminated(ctx, names)
            await engine.dispose()

    app = FastAPI(title="dstack", version=__version__, lifespan=lifespan, dependencies=[Depends(authorized)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    for r in (runs.router, runners.router, transfers.router, tags.router, code.router, artifacts.router, wheels.router):
        app.include_router(r)

    app.include_router(backend_routes.router)

    @app.get("/api/healthz", tags=["server", RUNNER_API])
    async def healthz() -> dict:
        return {"version": __version__}

    @app.exception_handler(DstackError)
    async def _dstack_error(_request: Request, exc: DstackError) -> JSONResponse:
        error = {k: _encodable(v) for k, v in exc.to_dict().items()}  # it may quote text that was not Unicode
        return JSONResponse(status_code=exc.http_status, content={"error": error})

    @app.exception_handler(UnicodeEncodeError)
    async def _not_unicode(_request: Request, exc: UnicodeEncodeError | None) -> JSONResponse:
        # text of the request that is not Unicode (a lone surrogate: "\udcff" in its JSON) met the database
        return JSONResponse(status_code=400, content={"error": {
            "kind": "config", "message": "the request holds text that is not Unicode (a lone surrogate such as "
                                        "\\udcff)", "hint": "send UTF-8 text"}})

    @app.exception_handler(DBAPIError)
    async def _database_refused(request: Request, exc: DBAPIError) -> JSONResponse:
        if getattr(exc.orig, "sqlstate", None) == "22021":  # PostgreSQL's text holds no NUL (SQLite's does)
            return JSONResponse(status_code=400, content={"error": {
                "kind": "config", "message": "the request holds a NUL character (\\x00), which the database does "
                                            "not store", "hint": "send text without NUL characters"}})
        return await _disk_full(request, exc)

    @app.exception_handler(OSError)
    @app.exception_handler(OperationalError)
    async def _disk_full(request: Request, exc: Exception) -> JSONResponse:
        """A full disk is said as such, naming the disk (503: try again once there is room); anything else
        is the server's own error."""
        if not is_disk_full(exc):
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            return JSONResponse(status_code=500, content={"error": {
                "kind": "error", "message": f"the server failed: {type(exc).__name__}", "hint": None}})
        error = disk_full(exc, settings.home / "server", "the server could not store what it was sent")
        return JSONResponse(status_code=error.http_status, content={"error": error.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        error = (first.get("ctx") or {}).get("error")
        if isinstance(error, DstackError):  # a rule of ours the models apply (a name's, core.names): as we word it
            return await _dstack_error(request, error)
        if first.get("type") == "string_unicode":  # a lone surrogate where a string is bounded
            return await _not_unicode(request, None)
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse(status_code=422, content={"error": {
            "kind": "error", "message": _encodable(f"bad request: {where}: {first.get('msg', 'invalid')}"),
            "hint": None}})

    return app


def _encodable(value):
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value

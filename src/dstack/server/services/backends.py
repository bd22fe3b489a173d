"""Backends the user configures (`dstack backends add / list / test / remove`) and the limits of every backend
(`dstack limits set / list / remove`). A configured backend is built from its settings through the plug-in
registry; its credentials are stored sealed (services/secrets.py) and reach only its constructor: the API never
returns them, and no message or log line holds them."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select

from dstack.backends.base import BackendError, Configurable, Offer
from dstack.backends.registry import BackendNotInstalled, backend_class, installed
from dstack.core.backends import BackendInfo, BackendRequest, InstanceInfo, Limits
from dstack.core.errors import ConfigError, Conflict, NotFound, did_you_mean
from dstack.server.context import Context
from dstack.server.db.tables import BackendRow, InstanceRow, LimitsRow

log = logging.getLogger("dstack.server")
BUILT_IN = "local"  # the backend every server has, configured by its settings, not by `backends add`
ALIVE = ("running", "terminating")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _class_of(kind: str) -> type:
    try:
        cls = backend_class(kind)
    except BackendNotInstalled:
        close = did_you_mean(kind, installed())
        raise ConfigError(f"no backend kind '{kind}' is installed" + (f" ({close})" if close else ""),
                          hint=f"installed: {', '.join(sorted(installed()))}; a backend is a package that registers "
                               "its class under the entry-point group 'dstack.backends'") from None
    if kind == BUILT_IN or not isinstance(cls, type) or not hasattr(cls, "settings_model"):
        raise ConfigError(f"the {kind} backend is built in: it is not added", hint="`dstack limits set` limits it")
    return cls


def _settings(cls: type, kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings, checked by the backend's model; an error names the key, never the value (it may be a
    secret)."""
    from pydantic import ValidationError

    try:
        model = cls.settings_model.model_validate(settings)
    except ValidationError as e:
        problems = _problems(e, "settings")
        keys = ", ".join(cls.settings_model.model_fields)
        raise ConfigError(f"the settings of a {kind} backend are wrong: {problems}", hint=f"its keys: {keys}") from None
    values = model.model_dump(mode="python")
    for k, v in values.items():  # SecretStr and the like: their values, for the backend and the seal
        if hasattr(v, "get_secret_value"):
            values[k] = v.get_secret_value()
    return values


def _problems(e, whole: str) -> str:
    """A pydantic ValidationError as `key: what is wrong; ...`, never the value (it may be a secret)."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or whole}: {err['msg']}"
                     for err in e.errors(include_input=False, include_url=False))


def build(ctx: Context, name: str, kind: str, settings: dict[str, Any]) -> Configurable:
    cls = _class_of(kind)
    try:
        return cls(name, _settings(cls, kind, settings), server_id=ctx.server_id, home=ctx.settings.home)
    except BackendError as e:  # its settings do not make a backend (a private key that is none)
        raise ConfigError(f"backend '{name}': {e}", hint="check its settings and credentials") from None


async def _tested(backend: Configurable) -> str:
    try:
        return await asyncio.to_thread(backend.test)
    except BackendError as e:
        raise ConfigError(f"backend '{backend.name}' does not work: {e}",
                          hint="check its settings and credentials, then add it again") from None


async def test(ctx: Context, req: BackendRequest | None = None, name: str | None = None) -> BackendInfo:
    """Check a backend against its provider: the one named (as stored), or the one described (not stored)."""
    if req is None:
        backend = next((b for b in ctx.backends if b.name == name), None)
        if backend is None or not hasattr(backend, "test"):
            await _row(ctx, name)  # NotFound, named
            raise ConfigError(f"backend '{name}' could not be loaded: {ctx.backend_notes.get(name, 'see the log')}")
        note = await _tested(backend)
        return (await list_backends(ctx, name))[0].model_copy(update={"note": note})
    backend = build(ctx, req.name, req.kind, req.settings)
    note = await _tested(backend)
    return BackendInfo(name=req.name, kind=req.kind, settings=_plain(type(backend), req.settings), note=note)


def _plain(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in cls.secrets}


async def add(ctx: Context, req: BackendRequest) -> BackendInfo:
    """Check the backend's settings against its provider, then keep them (credentials sealed)."""
    if req.name == BUILT_IN:
        raise ConfigError(f"'{BUILT_IN}' is the built-in backend's name", hint="name it otherwise (--name)")
    async with ctx.sessions() as s:
        if await s.get(BackendRow, req.name) is not None:
            raise Conflict(f"a backend named '{req.name}' exists", hint="`dstack backends remove` it first, or choose "
                                                                        "another --name")
    if req.name in ctx.removed_backends:
        raise Conflict(f"backend '{req.name}' is being removed: its instances are being terminated and what it "
                       "installed removed", hint="add it again once `dstack backends` no longer lists it (or choose "
                                                 "another --name)")
    backend = build(ctx, req.name, req.kind, req.settings)
    note = await _tested(backend)
    cls = type(backend)
    values = _settings(cls, req.kind, req.settings)
    secrets = {k: values[k] for k in cls.secrets if values.get(k) is not None}
    async with ctx.sessions() as s, s.begin():
        if await s.get(BackendRow, req.name) is not None:
            raise Conflict(f"a backend named '{req.name}' exists")
        s.add(BackendRow(name=req.name, kind=req.kind, settings=_jsonable(_plain(cls, values)),
                         secrets=ctx.sealer.seal(secrets) if secrets else None, created_at=_now()))
    ctx.backends.append(backend)
    _prepare(backend)
    log.info("backend %s (%s) added: %s", req.name, req.kind, note)
    return (await list_backends(ctx, req.name))[0].model_copy(update={"note": note})


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(values, default=str))


async def remove(ctx: Context, name: str) -> BackendInfo:
    """Forget the backend; its instances are terminated (idle ones at once, busy ones once their jobs end: the
    autoscaler drains them), and its limits go."""
    if name == BUILT_IN:
        raise ConfigError(f"the {BUILT_IN} backend is built in: it cannot be removed",
                          hint=f"`dstack limits set {BUILT_IN} --disable` stops it from starting runners")
    info = (await list_backends(ctx, name))[0]
    async with ctx.sessions() as s, s.begin():
        await s.execute(delete(BackendRow).where(BackendRow.name == name))
        await s.execute(delete(LimitsRow).where(LimitsRow.backend == name))
    ctx.limits.pop(name, None)
    # the backend object stays until its instances are gone (the autoscaler terminates them through it)
    ctx.removed_backends.add(name)
    for backend in [b for b in ctx.backends if b.name == name and hasattr(b, "close")]:
        await asyncio.to_thread(backend.close)
    ctx.signals.notify("jobs")
    log.info("backend %s removed; its %d instance(s) are being terminated", name, info.instances)
    return info


async def _row(ctx: Context, name: str | None) -> BackendRow:
    async with ctx.sessions() as s:
        row = await s.get(BackendRow, name) if name else None
    if row is None:
        names = [b.name for b in ctx.backends if b.name not in ctx.removed_backends]
        close = did_you_mean(name or "", names)
        raise NotFound(f"no backend named '{name}'" + (f" ({close})" if close else ""),
                       hint="`dstack backends` lists them")
    return row


async def list_backends(ctx: Context, name: str | None = None) -> list[BackendInfo]:
    async with ctx.sessions() as s:
        rows = (await s.scalars(select(BackendRow).order_by(BackendRow.name))).all()
        counts = dict((await s.execute(select(InstanceRow.backend, func.count()).where(
            InstanceRow.status.in_(ALIVE)).group_by(InstanceRow.backend))).all())
    found = []
    local = next((b for b in ctx.backends if b.name == BUILT_IN), None)
    if local is not None:
        found.append(BackendInfo(name=BUILT_IN, kind=BUILT_IN, settings={"max_runners": local.max_runners},
                                 limits=limits_of(ctx, BUILT_IN), instances=len(local.list()), configured=False))
    for row in rows:
        cls_secrets: tuple[str, ...] = ()
        try:
            cls_secrets = tuple(backend_class(row.kind).secrets)
        except Exception:  # its package is gone: listed all the same
            pass
        found.append(BackendInfo(name=row.name, kind=row.kind, settings=row.settings,
                                 secrets=[k for k in cls_secrets if row.secrets], limits=limits_of(ctx, row.name),
                                 instances=counts.get(row.name, 0), created_at=row.created_at,
                                 note=ctx.backend_notes.get(row.name) or _note(ctx, row.name)))
    if name is not None:
        found = [b for b in found if b.name == name]
        if not found:
            await _row(ctx, name)
    return found


def _note(ctx: Context, name: str) -> str | None:
    """What a backend says of itself (the ssh backend: hosts that do not answer)."""
    backend = next((b for b in ctx.backends if b.name == name), None)
    return backend.note() if backend is not None and hasattr(backend, "note") else None


async def forget_removed(ctx: Context, names: set[str]) -> None:
    """Removed backends whose instances are all gone: what they installed goes (`uninstall`), then the backend
    object. One whose uninstall fails stays, to be asked again."""
    import time

    for backend in [b for b in ctx.backends if b.name in names]:
        if hasattr(backend, "uninstall"):
            tries, after = ctx.uninstall_retries.get(backend.name, (0, 0.0))
            if time.monotonic() < after:
                continue
            try:
                await asyncio.to_thread(backend.uninstall)
            except Exception as e:  # a host that does not answer: asked again, less and less often
                delay = min(600.0, 5.0 * 2 ** tries)
                ctx.uninstall_retries[backend.name] = (tries + 1, time.monotonic() + delay)
                log.warning("backend %s: removing what it installed failed (asked again in %g s): %s", backend.name,
                            delay, e)
                continue
            ctx.uninstall_retries.pop(backend.name, None)
        ctx.backends.remove(backend)
        ctx.removed_backends.discard(backend.name)
        ctx.offer_cache.pop(backend.name, None)
        log.info("backend %s is gone, and what it installed", backend.name)


async def load(ctx: Context) -> None:
    """The configured backends and every backend's limits, as the server starts. One that cannot be built (its
    package is gone, its key replaced) is left out and said so in `dstack backends`; the others work."""
    async with ctx.sessions() as s:
        rows = (await s.scalars(select(BackendRow))).all()
        for lim in (await s.scalars(select(LimitsRow))).all():
            ctx.limits[lim.backend] = Limits.model_validate(lim.limits)
    for row in rows:
        try:
            settings = {**row.settings, **(ctx.sealer.open(row.secrets, row.name) if row.secrets else {})}
            backend = build(ctx, row.name, row.kind, settings)
            ctx.backends.append(backend)
            _prepare(backend)
        except Exception as e:  # one broken backend must not stop the server
            why = getattr(e, "message", None) or str(e) or type(e).__name__
            ctx.backend_notes[row.name] = f"not loaded: {why}"
            log.error("backend %s (%s) could not be loaded: %s", row.name, row.kind, why)


def _prepare(backend) -> None:
    """A backend the server keeps may get ready for its first runner (the docker backend's spare container)."""
    if hasattr(backend, "prepare"):
        backend.prepare()


async def close_all(ctx: Context) -> None:
    """The server stops: what backends keep ready goes (their runners go their own way)."""
    for backend in ctx.backends:
        if hasattr(backend, "close"):
            try:
                await asyncio.to_thread(backend.close)
            except Exception as e:  # the others still close
                log.warning("backend %s did not close: %s", backend.name, e)


def limits_of(ctx: Context, backend: str) -> Limits:
    return ctx.limits.get(backend) or Limits()


UNLIMITED = 1_000_000


def capacity(ctx: Context, backend) -> int:
    """The most instances the backend may have at once."""
    limits = limits_of(ctx, backend.name)
    if not limits.enabled or backend.name in ctx.removed_backends:
        return 0
    own = getattr(backend, "max_runners", None)  # the local backend's own setting
    return min(x for x in (own, limits.max_total, UNLIMITED) if x is not None)


def allowed_offers(ctx: Context, backend) -> tuple[list[Offer], list[tuple[Offer, str]]]:
    """The backend's offers that its limits allow (counts aside), and the others with why they are not."""
    limits = limits_of(ctx, backend.name)
    if capacity(ctx, backend) == 0:
        why = ("it is disabled" if not limits.enabled else "it is being removed" if backend.name in ctx.removed_backends
               else "its limit is 0 instances")
        return [], [(o, why) for o in backend.offers()]
    allowed, refused = [], []
    for o in backend.offers():
        why = limits.refusal(o.instance_type, o.region, o.spot, o.price)
        if why is None:
            allowed.append(o)
        else:
            refused.append((o, why))
    return allowed, refused


async def set_limits(ctx: Context, backend: str, changes: dict[str, Any]) -> Limits:
    """Change some of a backend's limits (the others stay). Instances over a lowered limit go: idle ones at once,
    busy ones once their jobs end."""
    if backend not in {b.name for b in ctx.backends} - ctx.removed_backends:
        await _row(ctx, backend)
    from pydantic import ValidationError

    try:
        new = Limits.model_validate({**limits_of(ctx, backend).model_dump(), **changes})
    except ValidationError as e:
        raise ConfigError(f"limits of {backend}: {_problems(e, 'limits')}") from None
    async with ctx.sessions() as s, s.begin():
        row = await s.get(LimitsRow, backend)
        if row is None:
            s.add(LimitsRow(backend=backend, limits=new.model_dump(mode="json")))
        else:
            row.limits = new.model_dump(mode="json")
    ctx.limits[backend] = new
    ctx.signals.notify("jobs")
    return new


async def remove_limits(ctx: Context, backend: str) -> Limits:
    async with ctx.sessions() as s, s.begin():
        await s.execute(delete(LimitsRow).where(LimitsRow.backend == backend))
    ctx.limits.pop(backend, None)
    ctx.signals.notify("jobs")
    return Limits()


async def list_instances(ctx: Context, include_gone: bool = False) -> list[InstanceInfo]:
    q = select(InstanceRow).order_by(InstanceRow.created_at)
    if not include_gone:
        q = q.where(InstanceRow.status.in_(ALIVE))
    async with ctx.sessions() as s:
        rows = (await s.scalars(q)).all()
    return [InstanceInfo(backend=r.backend, instance_id=r.instance_id, runner_name=r.runner_name,
                         instance_type=r.offer.get("instance_type"), region=r.offer.get("region"),
                         spot=bool(r.offer.get("spot")), price=float(r.offer.get("price") or 0), status=r.status,
                         created_at=r.created_at, terminated_at=r.terminated_at, reason=r.reason) for r in rows]


async def kinds() -> list[dict]:
    """Each installed kind that `backends add` takes: its settings' keys (type, default, help) and its secrets."""
    found = []
    for kind in sorted(installed()):
        if kind == BUILT_IN:
            continue
        try:
            cls = await asyncio.to_thread(backend_class, kind)
            schema = cls.settings_model.model_json_schema()
        except Exception as e:  # a plug-in that does not load is listed with why
            found.append({"kind": kind, "error": f"{type(e).__name__}: {e}", "settings": {}, "secrets": []})
            continue
        required = set(schema.get("required", []))
        settings = {k: {"type": v.get("type") or " | ".join(x.get("type", "?") for x in v.get("anyOf", [])),
                        "default": v.get("default"), "help": v.get("description") or v.get("title"),
                        "required": k in required}
                    for k, v in schema.get("properties", {}).items()}
        found.append({"kind": kind, "settings": settings, "secrets": list(cls.secrets),
                      "help": (cls.__doc__ or "").strip().split("\n")[0]})
    return found

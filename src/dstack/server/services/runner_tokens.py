"""Runner identities. Each runner holds a token of its own: issued by the admin (`dstack runners add`) for a
self-hosted runner, or by the backend that starts the runner (the `local` one included), never the admin's
token. The server keeps only the token's hash (SHA-256: tokens are 256 random bits, so a slow hash adds
nothing). What a runner token may do is decided in routers/deps.py: a runner's work, for itself alone."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from dstack.core.errors import Conflict, NotFound
from dstack.core.models import RunnerStatus, RunnerToken
from dstack.core.names import token as new_token
from dstack.server.context import Context
from dstack.server.db.tables import RunnerRow, RunnerTokenRow
from dstack.server.services.run_state import now

ADMIN = "admin"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue(ctx: Context, name: str | None, labels: dict[str, str], issued_by: str = ADMIN) -> RunnerToken:
    """A new runner identity and its token (returned once: only its hash is kept)."""
    from dstack.server.services.runners import new_name

    async with ctx.sessions() as s:
        if name is None:
            taken = set((await s.scalars(select(RunnerTokenRow.name))).all())
            name = await new_name(s, exclude=taken)
        elif await s.get(RunnerTokenRow, name) is not None:
            raise Conflict(f"runner {name} has a token already",
                           hint=f"`dstack runners remove {name}` first, or choose another --name")
        else:
            row = await s.get(RunnerRow, name)
            if row is not None and row.status in (RunnerStatus.READY.value, RunnerStatus.BUSY.value):
                raise Conflict(f"a runner named {name} is registered", hint="choose another --name")
        token = new_token()
        s.add(RunnerTokenRow(name=name, token_hash=token_hash(token), labels=labels, issued_by=issued_by,
                             created_at=now(), draining=False))
        await s.commit()
    ctx.runner_tokens[token_hash(token)] = name
    return RunnerToken(name=name, token=token, labels=labels)


async def runner_of(ctx: Context, token: str) -> str | None:
    """The name of the runner whose token this is; None for any other text."""
    digest = token_hash(token)
    name = ctx.runner_tokens.get(digest)
    if name is None:
        async with ctx.sessions() as s:
            name = await s.scalar(select(RunnerTokenRow.name).where(RunnerTokenRow.token_hash == digest))
        if name is not None:
            ctx.runner_tokens[digest] = name
    return name


async def draining(s) -> set[str]:
    """The names of the runners being drained (`dstack runners remove`), read in session `s`."""
    return set((await s.scalars(select(RunnerTokenRow.name).where(RunnerTokenRow.draining))).all())


async def identity(ctx: Context, name: str) -> RunnerTokenRow | None:
    async with ctx.sessions() as s:
        return await s.get(RunnerTokenRow, name)


async def revoke(ctx: Context, name: str) -> None:
    """The runner's token works no more, at once."""
    async with ctx.sessions() as s:
        row = await s.get(RunnerTokenRow, name)
        if row is None:
            raise NotFound(f"no runner named '{name}'", hint="`dstack runners -a` lists them")
        await s.delete(row)
        await s.commit()
    for digest in [d for d, n in ctx.runner_tokens.items() if n == name]:
        del ctx.runner_tokens[digest]


async def drain(ctx: Context, name: str) -> None:
    """Mark the runner draining: it takes no new job. A runner that joined with the admin's token gets an
    identity here that no token opens, only to hold that mark."""
    async with ctx.sessions() as s:
        row = await s.get(RunnerTokenRow, name)
        if row is None:
            row = RunnerTokenRow(name=name, token_hash=token_hash(new_token()), labels={}, issued_by=ADMIN,
                                 created_at=now())
            s.add(row)
        row.draining = True
        await s.commit()
    ctx.forget_quiet(name)  # its next heartbeat is told to leave (services/runners.heartbeat)

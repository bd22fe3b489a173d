from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from dstack.core.models import Tag
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx
from dstack.server.services import tags

router = APIRouter(prefix="/api/tags", tags=["tags"])


class TagRequest(BaseModel):
    repo_id: str
    run_name: str
    tag: str


@router.post("")
async def add(req: TagRequest, ctx: Context = Depends(get_ctx)) -> dict:
    tag, moved_from = await tags.add_tag(ctx, req.repo_id, req.run_name, req.tag)
    return {"tag": tag.model_dump(mode="json"), "moved_from": moved_from}


@router.delete("")
async def remove(repo_id: str, ref: str, ctx: Context = Depends(get_ctx)) -> list[Tag]:
    return await tags.remove(ctx, repo_id, ref)


@router.get("")
async def list_tags(repo_id: str, ctx: Context = Depends(get_ctx)) -> list[Tag]:
    return await tags.list_tags(ctx, repo_id)

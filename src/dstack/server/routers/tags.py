from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from dstack.core.models import RepoId, Tag, TagName
from dstack.core.names import MAX_REPO_ID, MAX_RUN_NAME, MAX_TAG, MAX_WORKFLOW_NAME
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx
from dstack.server.services import tags

router = APIRouter(prefix="/api/tags", tags=["tags"])


class TagRequest(BaseModel):
    repo_id: RepoId
    run_name: str = Field(max_length=MAX_RUN_NAME)
    tag: TagName


@router.post("")
async def add(req: TagRequest, ctx: Context = Depends(get_ctx)) -> dict:
    tag, moved_from = await tags.add_tag(ctx, req.repo_id, req.run_name, req.tag)
    return {"tag": tag.model_dump(mode="json"), "moved_from": moved_from}


@router.delete("")
async def remove(repo_id: str = Query(max_length=MAX_REPO_ID),
                 ref: str = Query(max_length=MAX_WORKFLOW_NAME + 1 + MAX_TAG), ctx: Context = Depends(get_ctx)) -> list[Tag]:
    return await tags.remove(ctx, repo_id, ref)


@router.get("")
async def list_tags(repo_id: str = Query(max_length=MAX_REPO_ID), ctx: Context = Depends(get_ctx)) -> list[Tag]:
    return await tags.list_tags(ctx, repo_id)

"""Examples and memory items: add, import (JSON records in the body, never a file path), list, curate, delete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ... import formats, registry, store
from ...errors import LISTED_PROBLEMS, UsageError, some
from ...settings import Settings
from ...wire import INT_MAX
from ..deps import ExampleId, Fresh, MemoryId, NoBody, SettingsDep, errors
from ..schemas import (
    Deleted,
    ExampleIn,
    ExampleList,
    ExampleOut,
    ImportRequest,
    ImportResult,
    MemoryIn,
    MemoryList,
    MemoryOut,
    Source,
    Status,
)

router = APIRouter(prefix="/assistant/training", tags=["examples"], dependencies=[Fresh])
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=INT_MAX)]
# words to look for (store.iter_examples): a blank one is refused there, as on the command line
Search = Annotated[str | None, Query(max_length=1000)]
R = TypeVar("R", store.Example, store.MemoryItem)


_example, _memory = ExampleOut.of, MemoryOut.of


@router.get("/examples", response_model=ExampleList, responses=errors(503))
async def list_examples(
    settings: SettingsDep,
    status: Status | None = None,
    source: Source | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
    search: Search = None,
) -> ExampleList:
    rows = await run_in_threadpool(
        store.list_examples, settings, source=source, status=status, limit=limit, offset=offset, search=search
    )
    return ExampleList(examples=[_example(r) for r in rows], count=len(rows))


@router.post("/examples", status_code=201, response_model=ExampleOut, responses=errors(409, 503))
async def add_example(body: ExampleIn, settings: SettingsDep) -> ExampleOut:
    ex = await run_in_threadpool(
        lambda: store.add_example(
            settings,
            prompt=body.prompt,
            response=body.response,
            system=body.system,
            turns=[t.model_dump() for t in body.turns],
            source=body.source,
            status=body.status,
            rating=body.rating,
            tags=body.tags,
            conversation_id=body.conversation_id,
        )
    )
    return _example(ex)


@router.post("/examples/import", response_model=ImportResult, responses=errors(409, 503))
async def import_examples(body: ImportRequest, settings: SettingsDep) -> ImportResult:
    drafts, shapes, problems = [], {}, []
    for i, record in enumerate(body.records):
        try:
            draft, shape = formats.parse_record(record, body.format, own_status=body.status is None)
        except formats.RecordError as err:
            problems.append(f"records[{i}]: {err.describe()}")
            continue
        drafts.append(draft)
        shapes[shape] = shapes.get(shape, 0) + 1
    if problems:  # all or nothing: one bad record imports none
        raise UsageError(f"Nothing imported: {some(problems)}.", details=problems[:LISTED_PROBLEMS])
    result = await run_in_threadpool(store.add_examples, settings, drafts, source=body.source, status=body.status)
    return ImportResult(
        records=len(drafts),
        added=result.added,
        duplicates=result.skipped_duplicates,
        formats=shapes,
        kept_beside=ImportResult.kept(result.kept_beside),
    )


async def _set(
    settings: Settings,
    set_status: Callable[[Settings, list[int], store.Status], int],
    get: Callable[[Settings, int], R],
    item_id: int,
    status: store.Status,
) -> R:
    """Curate one example or memory item and read it back; an unknown id is NotFound (404), nothing changed."""
    await run_in_threadpool(set_status, settings, [item_id], status)
    return await run_in_threadpool(get, settings, item_id)


@router.post("/examples/{id}/approve", response_model=ExampleOut, dependencies=[NoBody], responses=errors(404, 503))
async def approve_example(example_id: ExampleId, settings: SettingsDep) -> ExampleOut:
    return _example(await _set(settings, store.set_status, store.get_example, example_id, "approved"))


@router.post("/examples/{id}/reject", response_model=ExampleOut, dependencies=[NoBody], responses=errors(404, 503))
async def reject_example(example_id: ExampleId, settings: SettingsDep) -> ExampleOut:
    return _example(await _set(settings, store.set_status, store.get_example, example_id, "rejected"))


@router.delete("/examples/{id}", response_model=Deleted, dependencies=[NoBody], responses=errors(404, 503))
async def delete_example(example_id: ExampleId, settings: SettingsDep) -> Deleted:
    deletion = await run_in_threadpool(store.delete_examples, settings, [example_id])
    stale = await run_in_threadpool(registry.refresh_stale, settings, deletion.hashes)
    return Deleted(deleted=example_id, stale_adapters=stale, still_held_as=deletion.still_held)


@router.get("/memory", response_model=MemoryList, responses=errors(503))
async def list_memory(
    settings: SettingsDep, status: Status | None = None, limit: Limit = 50, offset: Offset = 0, search: Search = None
) -> MemoryList:
    rows = await run_in_threadpool(
        store.list_memory, settings, status=status, limit=limit, offset=offset, search=search
    )
    return MemoryList(items=[_memory(r) for r in rows], count=len(rows))


@router.post("/memory", status_code=201, response_model=MemoryOut, responses=errors(409, 503))
async def add_memory(body: MemoryIn, settings: SettingsDep) -> MemoryOut:
    item = await run_in_threadpool(
        lambda: store.add_memory(
            settings, question=body.question, answer=body.answer, topic=body.topic, status=body.status, tags=body.tags
        )
    )
    return _memory(item)


@router.post("/memory/{id}/approve", response_model=MemoryOut, dependencies=[NoBody], responses=errors(404, 503))
async def approve_memory(item_id: MemoryId, settings: SettingsDep) -> MemoryOut:
    return _memory(await _set(settings, store.set_memory_status, store.get_memory, item_id, "approved"))


@router.post("/memory/{id}/reject", response_model=MemoryOut, dependencies=[NoBody], responses=errors(404, 503))
async def reject_memory(item_id: MemoryId, settings: SettingsDep) -> MemoryOut:
    return _memory(await _set(settings, store.set_memory_status, store.get_memory, item_id, "rejected"))


@router.delete("/memory/{id}", response_model=Deleted, dependencies=[NoBody], responses=errors(404, 503))
async def delete_memory(item_id: MemoryId, settings: SettingsDep) -> Deleted:
    deletion = await run_in_threadpool(store.delete_memory, settings, [item_id])
    stale = await run_in_threadpool(registry.refresh_stale, settings, deletion.hashes)
    return Deleted(deleted=item_id, stale_adapters=stale, still_held_as=deletion.still_held)

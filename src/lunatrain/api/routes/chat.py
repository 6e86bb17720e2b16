"""The OpenAI-compatible chat API: `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/chat/completions`
(plain and streamed), in the wire format of OpenAI's API, so the official `openai` client works with
`base_url=http://127.0.0.1:5050/v1`.

Errors here have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; invalid requests are 400
(not FastAPI's 422), an unknown model 404, a full house 429. The serving engine (serving.py) is created on
the first request and its model loaded then, never at startup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import evalsuite, serving
from ...errors import LunaError, UsageError, said
from ...formats import NOT_UNICODE, is_unicode, join_parts
from ...settings import Settings
from ...web.handlers import INTERNAL, not_json, storage_fault, undecodable_body
from ...web.security import openai_error_body
from ...wire import parse_iso
from ..deps import SettingsDep, errors

log = logging.getLogger("lunatrain.api")

# --- wire models ----------------------------------------------------------------------------------


def _unicode(value: str) -> str:
    if not is_unicode(value):  # a Python str, but no text a tokenizer can encode
        raise ValueError(NOT_UNICODE)
    if "\x00" in value:  # as for stored examples (formats.checked_text): no chat template expects it
        raise ValueError("contains a NUL character")
    return value


Text = Annotated[str, AfterValidator(_unicode)]


# strict: `0` is not `false` and "3" is not a count; JSON has the right types, so use them (as the rest of the API).
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: Annotated[Text, Field(max_length=1_000_000)]


class Message(BaseModel):
    # `name` and other fields clients send: unused (no chat template of the families served renders a name)
    model_config = ConfigDict(extra="ignore", strict=True)

    # `tool` and `function` turns, and the calls an assistant turn made, are read only to be refused by name
    # (_refuse_unsupported): dropped, the answer would rest on a call whose result the model never saw.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = Field(default=None, validate_default=True)
    tool_calls: list[Any] | None = None
    function_call: Any = None

    @field_validator("content")
    @classmethod
    def _needs_content(cls, value: str | list[TextPart] | None, info: ValidationInfo) -> object:
        # An assistant turn may come back without text (a client replaying a turn); a system, developer or user
        # turn without text ("", blanks, no parts) would be rendered as an empty turn the user never wrote, which
        # training refuses to learn from too (serving trims the text as training does).
        role = info.data.get("role", "assistant")
        if role in ("assistant", "tool", "function"):
            return value
        if value is None:
            raise ValueError(f"a {role} message needs content (a string or a list of text parts)")
        text = join_parts([p.text for p in value]) if isinstance(value, list) else value
        if not text.strip():
            raise ValueError(f"a {role} message needs text; this one is empty")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):  # joined as training joins them
            return join_parts([p.text for p in self.content])
        return self.content or ""


class StreamOptions(BaseModel):
    # Other keys are refused by name (`_refuse_unsupported`): vLLM's continuous_usage_stats, answered as if it
    # had been honoured, gave usage only at the end.
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = False  # null: not sent, as for the request's own fields


# OpenAI's stream options that change nothing a client reads (padding against side channels): ignored.
IGNORED_STREAM_OPTIONS = frozenset({"include_obfuscation"})


# OpenAI's fields that change no answer (who asks, what to log, how fast): accepted and ignored. Any other field
# a request names is refused by name: an extension of another server (top_k, repetition_penalty, guided_json)
# or a newer OpenAI field (audio, web_search_options) would change the answer, and answering as if it had been
# honoured misleads the client.
IGNORED_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prediction",  # predicted output: speeds up an answer, never changes it
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    }
)
# Why a known OpenAI field is refused, in the refusal's words.
REFUSED_FIELDS = {
    "audio": "this server answers in text only",
    "web_search_options": "this server does not search the web",
    "reasoning_effort": "the models this server serves do not reason on request",
    "verbosity": "this server does not steer an answer's length by verbosity; use max_tokens",
}


class ChatRequest(BaseModel):
    """OpenAI's chat request: the fields lunatrain honours, and those it cannot honour (tools, JSON mode,
    log-probabilities, logit bias, n > 1), which `_refuse_unsupported` lets through only at their neutral
    values. Fields in IGNORED_FIELDS change no answer and are ignored; any other field is refused."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # NaN: "a finite number"

    model: str = Field(
        min_length=1,
        max_length=4096,  # a base model configured as a directory is named by its path (PATH_MAX on Linux)
        description="the base model id, an adapter name (its active version) or name@version",
    )
    messages: list[Message] = Field(min_length=1, max_length=1024)
    # No upper bound here: the bound is this server's cap (ASSISTANT_INFER_MAX_TOKENS), which _sampling names
    # in its refusal; a fixed schema bound above it refused 200,000 citing 131072, and then 100,000 for the cap.
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: (
        Annotated[str, Field(min_length=1, max_length=256)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=4)]
        | None
    ) = None  # one string, or up to four
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, description="only 1 (one choice per request)")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Not honoured: accepted at their neutral values only (see _refuse_unsupported).
    tools: list[Any] | None = Field(default=None, description="only [] (this server calls no tools)")
    tool_choice: Any = Field(default=None, description='only "none" or "auto"')
    functions: list[Any] | None = Field(default=None, description="only []")
    function_call: Any = Field(default=None, description='only "none" or "auto"')
    response_format: dict[str, Any] | None = Field(default=None, description='only {"type": "text"}')
    logprobs: bool | None = Field(default=None, description="only false")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="only 0")
    logit_bias: dict[str, Any] | None = Field(default=None, description="only {}")
    modalities: list[str] | None = Field(default=None, description='only ["text"]')


class ErrorDetail(BaseModel):
    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Example(BaseModel):
    id: str
    prompt: str
    messages: list[dict[str, str]]
    max_tokens: int
    lang: str | None = Field(
        default=None,
        description="the prompt's language: the case's own `lang`, else de or en where its id ends in it "
        "(`identity-de`: de)",
    )


class Examples(BaseModel):
    examples: list[Example]
    max_tokens: int = Field(description="this server's cap on a request's max_tokens (ASSISTANT_INFER_MAX_TOKENS)")


# --- errors in OpenAI's shape ---------------------------------------------------------------------


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    params: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = openai_error_body(status, message, code, param)
    # Beyond OpenAI's four fields, only where the sentence names values: the dashboard says it in its language.
    if params:
        body["params"] = params
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _from_luna(exc: LunaError) -> JSONResponse:
    details = exc.details if isinstance(exc.details, dict) else {}
    # 422 is FastAPI's; OpenAI answers every invalid request with 400 (and its client maps codes by that).
    status = 400 if exc.http_status in (409, 422) else exc.http_status
    headers = {"Retry-After": "1"} if status == 429 else None
    code = details.get("code", exc.code)
    return openai_error(
        status,
        exc.message,
        param=details.get("param"),
        code=code,
        # The values belong to the error's own code; a code the route chose instead has its own sentence.
        params=exc.params if code == exc.code else None,
        headers=headers,
    )


def _from_validation(exc: RequestValidationError) -> JSONResponse:
    path, words, _ = (said(exc.errors()) or [("", "malformed body", "")])[0]
    where = path.removeprefix("body").removeprefix(".")
    message = f"Invalid request: {where + ': ' if where else ''}{words}."
    return openai_error(400, message, param=where.split(".")[0] if where else None, code="invalid_request")


class OpenAIRoute(APIRoute):
    """Routes whose every error, validation included, answers in OpenAI's error shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if (problem := not_json(request)) is not None:
                    return openai_error(415, problem, code="unsupported_media_type")
                return _from_validation(exc)
            except LunaError as exc:
                return _from_luna(exc)
            except StarletteHTTPException as exc:
                if (invalid := undecodable_body(exc)) is not None:
                    return _from_validation(invalid)
                return openai_error(exc.status_code, str(exc.detail))
            except Exception as exc:  # in OpenAI's shape too, as the stream reports the same fault
                if (fault := storage_fault(exc)) is not None:
                    return _from_luna(fault)
                log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
                return openai_error(500, INTERNAL, code="internal")  # the code the dashboard says in its language

        return route


_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chat.completion.chunk as JSON, or [DONE]"}},
}
router = APIRouter(prefix="/v1", tags=["chat"], route_class=OpenAIRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError, "description": text}
    for code, text in {
        400: "Invalid request (OpenAI's invalid_request_error), or Host header not allowed",
        401: "Bearer token missing or wrong (when ASSISTANT_API_TOKEN is set)",
        403: "Cross-origin request refused",
        404: "No such model",
        413: "Request body too large",
        429: "Every generation slot is busy; retry",
        503: "The base model (base_model_unavailable) or the adapter's files (storage_error) cannot be loaded",
    }.items()
}


# --- the engine, created on first use -------------------------------------------------------------


def _engine(request: Request) -> tuple[serving.Engine, serving.Slots]:
    state = request.app.state
    engine = getattr(state, "chat_engine", None)
    if engine is None:
        settings: Settings = state.settings
        engine = state.chat_engine = serving.Engine(settings, max_adapters=settings.infer_max_adapters)
        state.chat_slots = serving.Slots(settings.infer_max_concurrent)
    return engine, state.chat_slots


def _created(stamp: str | None) -> int:
    try:
        return int(parse_iso(stamp).timestamp()) if stamp else 0
    except ValueError:
        return 0


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    """The models this server answers as: the base model, each adapter's active version (by its name) and
    every adapter version trained on the served base (name@version)."""
    engine, _ = _engine(request)
    items = await run_in_threadpool(engine.models)
    return ModelList(data=[_card(m) for m in items])


# `path`: a base model's hub id has a `/` (Qwen/Qwen2.5-0.5B), which the official client sends as %2F.
@router.get("/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """One model as GET /v1/models lists it: the base model's id, an adapter name or name@version."""
    engine, _ = _engine(request)
    return _card(await run_in_threadpool(engine.served_model, model))


def _card(m: dict[str, Any]) -> ModelCard:
    return ModelCard(
        id=m["id"], created=_created(m.get("created")), owned_by="lunatrain" if m["kind"] != "base" else "base"
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=_ERRORS
    | {
        200: {
            "description": "the answer; with stream=true as server-sent events",
            # before OpenAPI 3.2 an event stream's `schema` describes one event
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        }
    },
)
async def chat_completions(body: ChatRequest, request: Request, settings: SettingsDep):
    """Answer a chat with the base model, an adapter's active version, or name@version (OpenAI's format)."""
    sampling = _sampling(body, settings)
    engine, slots = _engine(request)
    target = await run_in_threadpool(engine.resolve, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    slots.acquire()
    try:
        gen = await run_in_threadpool(engine.start, target, messages, sampling)
    except BaseException:
        slots.release()
        raise
    gen.on_close = slots.release  # from here on the answer gives its slot back, however it ends
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        # gen.close as background task too: it runs when a client leaves before the first event is sent.
        return StreamingResponse(
            _events(gen, ident, created, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(gen.close),
        )
    try:
        text = await _answer(gen, request)
    finally:
        gen.close()
    return ChatCompletion(
        id=ident,
        created=created,
        model=target.model,
        usage=_usage(gen),
        system_fingerprint=_fingerprint(target),
        choices=[Choice(index=0, message=AssistantMessage(content=text), finish_reason=gen.finish_reason or "stop")],
    )


async def _answer(gen: serving.Generation, request: Request) -> str:
    """The whole answer, generated a piece at a time as a stream is: a client that leaves (its read timeout,
    Ctrl-C; the official client then retries) ends the generation at the next piece and frees its slot,
    instead of holding it up to max_tokens for an answer nobody reads."""
    while await run_in_threadpool(gen.step) is not None:
        if await request.is_disconnected():
            break
    return gen.text


def _refuse_unsupported(body: ChatRequest) -> None:
    """A request for what this server cannot do is refused, naming the parameter: answering prose where JSON,
    a tool call or log-probabilities were asked for would look like an answer to the request and is not. The
    neutral values that clients send by default (an empty list, "none", {"type": "text"}, false) pass."""

    def refuse(param: str, words: str, code: str = "unsupported_value") -> None:
        # a field name that is no plain word ("", one with a newline) is quoted, so the sentence shows it
        said = param if all(part.isidentifier() for part in param.split(".")) else json.dumps(param)
        raise UsageError(f"{said}: {words}", details={"param": param, "code": code})

    for param in ("tools", "functions"):
        if getattr(body, param):
            refuse(param, "this server calls no tools; send the request without them.", code="unsupported_parameter")
    for param in ("tool_choice", "function_call"):
        if getattr(body, param) not in (None, "none", "auto"):
            refuse(param, 'this server calls no tools, so only "none" or "auto" can be chosen.')
    if body.response_format is not None and body.response_format != {"type": "text"}:
        refuse("response_format", 'this server answers in plain text only ({"type": "text"}); no JSON mode.')
    if body.logprobs:
        refuse("logprobs", "this server does not return log-probabilities.")
    if body.top_logprobs:
        refuse("top_logprobs", "this server does not return log-probabilities.")
    if body.logit_bias:
        refuse(
            "logit_bias", "this server does not bias tokens; send the request without it.", code="unsupported_parameter"
        )
    if body.n is not None and body.n > 1:
        refuse("n", "this server makes one answer per request (n: 1); send the request n times.")
    if body.modalities is not None and body.modalities != ["text"]:
        refuse("modalities", 'this server answers in text only (["text"]).')
    for field, value in (body.model_extra or {}).items():
        if field not in IGNORED_FIELDS and value is not None:
            why = REFUSED_FIELDS.get(field, "this server does not know this parameter")
            refuse(field[:64], f"{why}; send the request without it.", code="unsupported_parameter")
    for i, message in enumerate(body.messages):
        if message.role in ("tool", "function"):
            refuse("messages", f"message {i} is a {message.role} result, and this server calls no tools.")
        if message.tool_calls or message.function_call is not None:
            refuse("messages", f"message {i} calls tools, and this server calls no tools; send the turns without it.")
    if body.stream_options is not None and not body.stream:  # as OpenAI answers it: asked for, it would be ignored
        refuse("stream_options", "only allowed with stream: true.", code="invalid_value")
    for field, value in ((body.stream_options and body.stream_options.model_extra) or {}).items():
        if field not in IGNORED_STREAM_OPTIONS and value is not None:
            refuse(f"stream_options.{field[:64]}", "this server does not know this stream option; send the request "
                   "without it.", code="unsupported_parameter")  # fmt: skip


def _sampling(body: ChatRequest, settings: Settings) -> serving.Sampling:
    _refuse_unsupported(body)
    cap = settings.infer_max_tokens
    wanted = body.max_completion_tokens or body.max_tokens
    if wanted is not None and wanted > cap:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise UsageError(
            f"{param} {wanted} is over this server's cap of {cap} (ASSISTANT_INFER_MAX_TOKENS).",
            details={"param": param, "code": "invalid_value"},
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return serving.Sampling(
        max_tokens=wanted or cap,
        up_to_context=wanted is None,  # the client set no length: the cap is ours, so a long prompt shortens it
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


def _usage(gen: serving.Generation) -> Usage:
    return Usage(
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        total_tokens=gen.prompt_tokens + gen.completion_tokens,
    )


def _fingerprint(target: serving.Target) -> str:
    """OpenAI's `system_fingerprint`: an opaque token that changes with what answers (this release, the model,
    the adapter revision's files, the base's quantization), never the model's local path."""
    from ... import __version__

    seen = f"{__version__}\0{target.model}\0{target.path or ''}\0{target.files}".encode()
    if target.quantize != "none":  # unquantized keeps the token it had
        seen += f"\0{target.quantize}".encode()
    return "fp_" + hashlib.sha256(seen).hexdigest()[:12]


def _chunk(
    ident: str, created: int, target: serving.Target, delta: dict | None, finish: str | None, usage: Any = False
) -> str:
    """One event; `delta` None: the usage chunk (no choices). With include_usage every chunk has `usage`, null
    but in the last, as OpenAI sends them (`usage` False: the key is left out)."""
    data = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": target.model,
        "system_fingerprint": _fingerprint(target),
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not False:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(gen: serving.Generation, ident: str, created: int, usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a role chunk, content chunks, a finish chunk, optionally a
    usage chunk, then `[DONE]`. A client that goes away cancels this at the next token; the finally frees
    the slot and the adapter either way."""
    none = None if usage else False  # each chunk's usage until the last
    try:
        yield _chunk(ident, created, gen.target, {"role": "assistant", "content": ""}, None, none)
        while (piece := await run_in_threadpool(gen.step)) is not None:
            yield _chunk(ident, created, gen.target, {"content": piece}, None, none)
        yield _chunk(ident, created, gen.target, {}, gen.finish_reason or "stop", none)
        if usage:
            yield _chunk(ident, created, gen.target, None, None, _usage(gen).model_dump())
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are sent: report in the stream, as OpenAI does, not as a 500
        message = exc.message if isinstance(exc, LunaError) else "Generation failed; the server log has the details."
        if not isinstance(exc, LunaError):
            log.exception("chat stream failed", exc_info=exc)
        code = exc.code if isinstance(exc, LunaError) else "internal"
        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': code}})}\n\n"
    finally:
        gen.close()


# Not part of OpenAI's API, so outside /v1 and with lunatrain's usual error shape.
# A case that does not say its `lang` (a suite copied before it could): the shipped suite's id convention,
# identity-de and identity-en, for the dashboard's two languages only (`smalltalk-ok` names none).
_LANG_SUFFIX = re.compile(r"[-_](de|en)$")
examples_router = APIRouter(prefix="/assistant/chat", tags=["chat"])


@examples_router.get("/examples", response_model=Examples, responses=errors())
async def examples(settings: SettingsDep) -> Examples:
    """The eval gate's golden cases as ready prompts (the dashboard's one-click examples)."""
    cases = await run_in_threadpool(evalsuite.load_suite, settings)
    # Ready to send: never more tokens than this server's cap, which would refuse the example as offered.
    cap = settings.infer_max_tokens
    return Examples(
        examples=[
            Example(
                id=c.id,
                prompt=c.messages[-1]["content"],
                messages=c.messages,
                max_tokens=min(c.max_new_tokens, cap),
                lang=c.lang or (m.group(1) if (m := _LANG_SUFFIX.search(c.id)) else None),
            )
            for c in cases
        ],
        max_tokens=cap,
    )

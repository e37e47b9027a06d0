"""The HTTP ingress: OpenAI-compatible routes in front of the decode pool.

    client ──HTTP (OpenAI API, x-session-id)──▶ [Router: OpenAIServer]
        read the body (413 past max_body_bytes), validate (400 naming the field), render the chat
        template (tools included), tokenize, check prompt + max_tokens against the context length
                    │ GenerateRequest(request_id, session_id, prompt ids, sampling)
                    ▼ streaming handle call: DecodeWorker.generate
             DecodeWorker pool ──GenerateChunk*──▶ SSE deltas, or one JSON response

`OpenAIServer` holds all of it and knows nothing of Ray: it takes a tokenizer and a `generate`
callable (GenerateRequest -> async generator of GenerateChunk). `build_fastapi_app(server)` serves it
with FastAPI (tests, plain uvicorn); `router_deployment()` wraps the same handlers in a Ray Serve
ingress deployment whose `generate` is a streaming call to the DecodeWorker's deployment handle.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and GET /stats
when a stats hook is given. Request ids are `chatcmpl-<hex>` / `cmpl-<hex>`; the agent session is
the `x-session-id` header (1-128 printable ASCII characters, no spaces), or a fresh `session-<hex>`
per request; every response echoes it in `x-session-id`.

Errors have OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for bad input (the
message names the field), 401 without a valid API key when keys are configured (every route but
/health; see security.py for keys and limits), 404 for an unknown model or route, 413 for an
oversized body, 503 when
generation fails (a failed chunk from the worker or an exception from the handle). A stream waits
for the first chunk before it sends its headers, so a request that fails before producing a token
gets a 503 too; a failure after that is an SSE event `data: {"error": {...}}`, and the stream ends
without `[DONE]`.

Cancellation: whenever the server stops reading a request's stream early (the client disconnected,
the request failed, or the Serve replica cancelled the handler), it closes the `generate` async
generator (`aclose`), which for the handle call cancels the DecodeWorker's request, and the worker
frees its KV blocks. Client disconnects are watched on the ASGI `receive` channel while a
non-streaming request (or a stream's first chunk) is pending, and by the streaming response itself
afterwards.
"""

# No `from __future__ import annotations` here: the Serve Router's methods are cloudpickled by value,
# and FastAPI must see `request: Request` as the class itself, not as a name it can no longer resolve.
import asyncio
import functools
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mixquant_serve.api import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    FunctionCallOut,
    MixquantStats,
    ModelCard,
    ModelList,
    SamplingFields,
    ToolCallDelta,
    ToolCallOut,
    describe_validation_error,
    sampling_params,
    usage_of,
)
from mixquant_serve.model.tokenizer import Tokenizer
from mixquant_serve.openapi import install_openapi
from mixquant_serve.protocol import GenerateChunk, GenerateRequest
from mixquant_serve.security import UNAUTHORIZED_MESSAGE, ApiKeySource, ApiKeyVerifier, load_api_keys, prompt_limit_problem
from mixquant_serve.tool_calls import ToolCall, ToolCallStreamFilter, parse_tool_calls

logger = logging.getLogger(__name__)

GenerateFn = Callable[[GenerateRequest], AsyncGenerator[GenerateChunk, None]]
StatsFn = Callable[[], Awaitable[dict[str, Any]]]
EventsFn = Callable[["Call", AsyncIterator[GenerateChunk]], AsyncGenerator[str, None]]  # a request's SSE events
T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
SESSION_HEADER = "x-session-id"
SESSION_ID_PATTERN = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces
FAILED_FINISH_REASONS = ("error", "abort")
ERROR_DETAIL_CHARS = 500  # longest worker error text passed on to the client
SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # name of the OpenAIServer method (and of the Serve Router method)


ROUTES = (
    Route("POST", "/v1/chat/completions", "chat_completions"),
    Route("POST", "/v1/completions", "completions"),
    Route("GET", "/v1/models", "models"),
    Route("GET", "/health", "health"),
)
STATS_ROUTE = Route("GET", "/stats", "stats")


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer must know about the served model."""

    model_name: str  # the only accepted `model`, listed by /v1/models
    max_model_len: int  # prompt + output tokens: the decode engine's limit (see EngineCore.max_model_len)
    max_tokens_cap: int  # largest max_tokens a request may ask for; also caps the default
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    vocab_size: int | None = None  # bound for token-id prompts; default: the tokenizer's vocabulary size
    max_prompt_tokens: int | None = None  # longest prompt after the chat template; None: only the context bounds it
    api_keys: ApiKeySource | None = None  # where each server reads its API keys; None: no authentication

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be a non-empty string")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")
        for name in ("max_model_len", "max_tokens_cap", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 or None, got {self.vocab_size}")


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        body = ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=body).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class GenerationFailed(Exception):
    """The decode worker reported a failure, or the call to it raised."""


def generation_error(error: Exception) -> ApiError:
    detail = str(error) if isinstance(error, GenerationFailed) else f"{type(error).__name__}: {error}"
    message = f"generation failed: {detail[:ERROR_DETAIL_CHARS]}"
    return ApiError(503, message, code="generation_failed", kind="server_error")


class ClientDisconnected(Exception):
    """The client went away before its response; answered with status 499, which nobody reads."""


@dataclass(frozen=True)
class Call:
    """One admitted request: its ids and what its responses repeat."""

    request: GenerateRequest
    created: int
    model: str
    include_usage: bool

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def headers(self) -> dict[str, str]:
        return {SESSION_HEADER: self.request.session_id}


class OpenAIServer:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        generate: GenerateFn,
        settings: ServerSettings,
        stats: StatsFn | None = None,
    ):
        """`tokenizer` None (synthetic models) serves only /v1/completions with token-id prompts.

        `generate` must return an async generator; the server closes it when it stops reading early.
        `stats` feeds GET /stats (dashboards).
        """
        if tokenizer is None and settings.vocab_size is None:
            raise ValueError("settings.vocab_size is required when there is no tokenizer")
        self.tokenizer = tokenizer
        self.generate = generate
        self.settings = settings
        self.stats_hook = stats
        self.vocab_size = settings.vocab_size if settings.vocab_size is not None else tokenizer.vocab_size
        self.created = int(time.time())
        self.api_keys = ApiKeyVerifier(load_api_keys(settings.api_keys)) if settings.api_keys is not None else None
        # chat templates and long prompts take milliseconds to seconds: keep them off the event loop
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def routes(self) -> tuple[Route, ...]:
        return ROUTES + ((STATS_ROUTE,) if self.stats_hook is not None else ())

    # ------------------------------------------------------------------------------------------ routes

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        chat = validate(ChatCompletionRequest, await read_json_body(request, self.settings.max_body_bytes))
        self._check_model(chat.model)
        session_id = session_id_from(request)
        prompt_ids = await self._tokenize_chat(chat)
        call = self._admit(chat, "chatcmpl", session_id, prompt_ids, "messages")
        if chat.stream:
            return await self._start_stream(request, call, functools.partial(self._chat_events, chat))
        output = await self._generate_all(request, call)
        response = self._chat_response(chat, call, output.text, output.last)
        return JSONResponse(response.model_dump(mode="json"), headers=call.headers())

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        completion = validate(CompletionRequest, await read_json_body(request, self.settings.max_body_bytes))
        self._check_model(completion.model)
        session_id = session_id_from(request)
        prompt_ids = await self._tokenize_prompt(completion.prompt)
        call = self._admit(completion, "cmpl", session_id, prompt_ids, "prompt")
        with_ids = bool(completion.return_token_ids)
        if completion.stream:
            return await self._start_stream(request, call, functools.partial(self._completion_events, with_ids))
        output = await self._generate_all(request, call)
        last = output.last
        choice = CompletionChoice(text=output.text, finish_reason=last.finish_reason,
                                  token_ids=output.token_ids if with_ids else None)
        response = CompletionResponse(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=[choice],
            usage=usage_of(call.num_prompt_tokens, last.num_output_tokens, last.stats),
            mixquant=MixquantStats.from_stats(last.stats) if last.stats else None,
        )
        return JSONResponse(completion_payload(response), headers=call.headers())

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = ModelCard(id=self.settings.model_name, created=self.created, max_model_len=self.settings.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def stats(self, request: Request) -> Response:
        self._authorize(request)
        if self.stats_hook is None:
            raise ApiError(404, "no stats source is configured", code="not_found")
        return JSONResponse(await self.stats_hook())

    # ------------------------------------------------------------------------------------------ admission

    def _authorize(self, request: Request) -> None:
        """401 unless API keys are off or the request carries one of them (before its body is read)."""
        if self.api_keys is not None and not self.api_keys.is_authorized(request.headers.get("authorization")):
            raise ApiError(401, UNAUTHORIZED_MESSAGE, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; this server serves {self.settings.model_name!r} "
                "(see /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def _tokenize_chat(self, chat: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            message = "messages: this model has no tokenizer; send token ids to /v1/completions"
            raise ApiError(400, message, param="messages")
        render = functools.partial(self.tokenizer.apply_chat_template, chat.template_messages(), chat.template_tools())
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, render)
        except (ValueError, TemplateError) as error:  # the tokenizer's message checks, or the template refusing
            raise ApiError(400, f"messages: {error}", param="messages") from None

    async def _tokenize_prompt(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            bad = next((token for token in prompt if not 0 <= token < self.vocab_size), None)
            if bad is not None:
                message = f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})"
                raise ApiError(400, message, param="prompt")
            return list(prompt)
        if self.tokenizer is None:
            raise ApiError(400, "prompt: this model has no tokenizer; send a list of token ids", param="prompt")
        text = prompt if isinstance(prompt, str) else prompt[0]
        ids = await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self.tokenizer.encode, text)
        if not ids:
            raise ApiError(400, "prompt: must contain at least one token", param="prompt")
        return ids

    def _admit(
        self, fields: SamplingFields, id_prefix: str, session_id: str, prompt_ids: list[int], prompt_field: str
    ) -> Call:
        max_tokens = self._max_tokens(fields, len(prompt_ids), prompt_field)
        request = GenerateRequest(
            request_id=f"{id_prefix}-{uuid.uuid4().hex}",
            session_id=session_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling_params(fields, max_tokens),
        )
        return Call(request, int(time.time()), self.settings.model_name, fields.include_usage)

    def _max_tokens(self, fields: SamplingFields, num_prompt_tokens: int, prompt_field: str) -> int:
        """The request's output limit: as asked, or the room left in the context (both capped)."""
        context, cap = self.settings.max_model_len, self.settings.max_tokens_cap
        too_long = prompt_limit_problem(num_prompt_tokens, self.settings.max_prompt_tokens, prompt_field)
        if too_long is not None:
            raise ApiError(400, too_long, param=prompt_field, code="prompt_too_long")
        room = context - num_prompt_tokens
        if room < 1:
            raise ApiError(
                400,
                f"{prompt_field}: the prompt has {num_prompt_tokens} tokens, which leaves no room for output "
                f"within the model's context length of {context} tokens",
                param=prompt_field,
                code="context_length_exceeded",
            )
        requested, field = fields.requested_max_tokens()
        if requested is None:
            return min(room, cap)
        if requested > cap:
            raise ApiError(400, f"{field}: {requested} exceeds this server's limit of {cap}", param=field)
        if requested > room:
            raise ApiError(
                400,
                f"{field}: {requested} output tokens plus the {num_prompt_tokens} prompt tokens of {prompt_field} "
                f"exceed the model's context length of {context}; ask for at most {room} or shorten {prompt_field}",
                param=field,
                code="context_length_exceeded",
            )
        return requested

    # ------------------------------------------------------------------------------------------ responses

    def _chat_response(
        self, chat: ChatCompletionRequest, call: Call, text: str, last: GenerateChunk
    ) -> ChatCompletionResponse:
        content: str | None = text
        calls: list[ToolCall] = []
        if chat.uses_tools:
            parsed = parse_tool_calls(text, model_stopped=last.finish_reason == "stop")
            calls = limit_calls(parsed.tool_calls, chat.parallel_tool_calls)
            if calls:
                content = parsed.content.strip() or None
        tool_calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
        message = ChatMessageOut(content=content, tool_calls=tool_calls or None)
        return ChatCompletionResponse(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=[ChatChoice(message=message, finish_reason="tool_calls" if calls else last.finish_reason)],
            usage=usage_of(call.num_prompt_tokens, last.num_output_tokens, last.stats),
            mixquant=MixquantStats.from_stats(last.stats) if last.stats else None,
        )

    async def _generate_all(self, request: Request, call: Call) -> "Output":
        """The whole output and its final chunk; 503 on failure, ClientDisconnected if the client leaves."""
        stream = self.generate(call.request)
        try:
            return await unless_disconnected(request, collect(stream))
        except ClientDisconnected:
            raise
        except Exception as error:
            logger.warning("%s failed: %r", call.id, error)
            raise generation_error(error) from None
        finally:
            await close_quietly(stream)

    async def _start_stream(self, request: Request, call: Call, events: EventsFn) -> Response:
        """Waits for the first chunk (errors before it are a 503), then streams `events` as SSE."""
        stream = self.generate(call.request)
        streaming = False
        try:
            first = await unless_disconnected(request, first_chunk(stream))
            streaming = True
        except ClientDisconnected:
            raise
        except Exception as error:
            logger.warning("%s failed before its first token: %r", call.id, error)
            raise generation_error(error) from None
        finally:
            if not streaming:  # from here on the response owns the stream
                await close_quietly(stream)
        return ClosingStreamingResponse(
            sse_with_errors(call, events(call, chunks_from(first, stream)), stream),
            media_type="text/event-stream",
            headers={**call.headers(), "Cache-Control": "no-cache"},
        )

    async def _chat_events(
        self, chat: ChatCompletionRequest, call: Call, chunks: AsyncIterator[GenerateChunk]
    ) -> AsyncGenerator[str, None]:
        filter_ = ToolCallStreamFilter() if chat.uses_tools else None
        yield chat_chunk_event(call, ChatDelta(role="assistant", content=""))
        last: GenerateChunk | None = None
        async for chunk in chunks:
            last = chunk
            content = filter_.push(chunk.text_delta) if filter_ is not None else chunk.text_delta
            if content:
                yield chat_chunk_event(call, ChatDelta(content=content))
        assert last is not None  # chunks_from yields at least the first chunk
        finish_reason = last.finish_reason
        if filter_ is not None:
            rest, calls = filter_.finish(model_stopped=finish_reason == "stop")
            calls = limit_calls(calls, chat.parallel_tool_calls)
            if rest:
                yield chat_chunk_event(call, ChatDelta(content=rest))
            if calls:
                deltas = [
                    ToolCallDelta(index=i, id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                    for i, c in enumerate(calls)
                ]
                yield chat_chunk_event(call, ChatDelta(tool_calls=deltas))
                finish_reason = "tool_calls"
        mixquant = MixquantStats.from_stats(last.stats) if last.stats else None
        yield chat_chunk_event(call, ChatDelta(), finish_reason=finish_reason, mixquant=mixquant)
        if call.include_usage:
            usage = usage_of(call.num_prompt_tokens, last.num_output_tokens, last.stats)
            chunk = ChatCompletionChunk(id=call.id, created=call.created, model=call.model, choices=[], usage=usage)
            yield sse(chunk_payload(chunk, call.include_usage))
        yield SSE_DONE

    async def _completion_events(
        self, with_ids: bool, call: Call, chunks: AsyncIterator[GenerateChunk]
    ) -> AsyncGenerator[str, None]:
        """One event per chunk with text (or, with `with_ids`, with token ids), then the finish event."""
        last: GenerateChunk | None = None
        async for chunk in chunks:
            last = chunk
            if (chunk.text_delta or with_ids and chunk.token_ids) and not chunk.finished:
                yield completion_chunk_event(call, chunk.text_delta, None, token_ids=chunk.token_ids if with_ids else None)
        assert last is not None
        mixquant = MixquantStats.from_stats(last.stats) if last.stats else None
        ids = last.token_ids if with_ids else None
        yield completion_chunk_event(call, last.text_delta, last.finish_reason, mixquant, token_ids=ids)
        if call.include_usage:
            usage = usage_of(call.num_prompt_tokens, last.num_output_tokens, last.stats)
            chunk = CompletionResponse(id=call.id, created=call.created, model=call.model, choices=[], usage=usage)
            yield sse(chunk_payload(chunk, call.include_usage))
        yield SSE_DONE


# ---------------------------------------------------------------------------------------------- request helpers


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `max_bytes` (checked on Content-Length, then while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(int(declared), max_bytes)
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > max_bytes:
                raise body_too_large(len(body), max_bytes)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    if not body:
        raise ApiError(400, "the request body is empty; expected a JSON object")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(payload).__name__}")
    return payload


def body_too_large(size: int, max_bytes: int) -> ApiError:
    message = f"the request body ({size} bytes or more) exceeds the limit of {max_bytes} bytes"
    return ApiError(413, message, code="request_too_large")


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate(model: type[ModelT], payload: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        message, param = describe_validation_error(error)
        raise ApiError(400, message, param=param) from None


def session_id_from(request: Request) -> str:
    value = request.headers.get(SESSION_HEADER)
    if value is None:
        return f"session-{uuid.uuid4().hex}"
    if not SESSION_ID_PATTERN.fullmatch(value):
        raise ApiError(
            400, f"{SESSION_HEADER}: must be 1-128 printable ASCII characters without spaces", param=SESSION_HEADER
        )
    return value


def limit_calls(calls: list[ToolCall], parallel_tool_calls: bool | None) -> list[ToolCall]:
    """parallel_tool_calls=false: only the first call is returned."""
    return calls[:1] if parallel_tool_calls is False else calls


# ---------------------------------------------------------------------------------------------- stream helpers


def raise_if_failed(chunk: GenerateChunk) -> None:
    if chunk.finish_reason in FAILED_FINISH_REASONS:
        reason = f"the decode worker ended the request with finish_reason={chunk.finish_reason!r}"
        raise GenerationFailed(chunk.error or reason)


@dataclass(frozen=True)
class Output:
    """A whole request's output: its text, its token ids and the final chunk (finish reason, stats)."""

    text: str
    token_ids: list[int]
    last: GenerateChunk


async def collect(stream: AsyncIterator[GenerateChunk]) -> Output:
    """All text and token ids of a request, and its final chunk."""
    parts: list[str] = []
    token_ids: list[int] = []
    async for chunk in stream:
        raise_if_failed(chunk)
        parts.append(chunk.text_delta)
        token_ids.extend(chunk.token_ids)
        if chunk.finished:
            return Output("".join(parts), token_ids, chunk)
    raise GenerationFailed("the decode worker's stream ended without a final chunk")


async def first_chunk(stream: AsyncIterator[GenerateChunk]) -> GenerateChunk:
    try:
        chunk = await stream.__anext__()
    except StopAsyncIteration:
        raise GenerationFailed("the decode worker's stream ended without output") from None
    raise_if_failed(chunk)
    return chunk


async def chunks_from(first: GenerateChunk, stream: AsyncIterator[GenerateChunk]) -> AsyncIterator[GenerateChunk]:
    """`first`, then the stream's chunks up to the finished one; a failed or truncated stream raises."""
    chunk = first
    while True:
        raise_if_failed(chunk)
        yield chunk
        if chunk.finished:
            return
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            raise GenerationFailed("the decode worker's stream ended without a final chunk") from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its stream must be idle before it is closed
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the ASGI server reports the client gone (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def close_quietly(stream: AsyncGenerator[Any, None]) -> None:
    """Closes an async generator even inside a cancelled scope (for the generate stream: frees the worker's blocks)."""
    with anyio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except Exception as error:  # a stream that fails while closing has nothing left to free here
            logger.warning("closing a generate stream raised %r", error)


async def sse_with_errors(
    call: Call, events: AsyncGenerator[str, None], stream: AsyncGenerator[GenerateChunk, None]
) -> AsyncIterator[str]:
    """Forwards `events`; a failure becomes an SSE error event. Always closes `events` and `stream` at the end."""
    try:
        async for event in events:
            yield event
    except Exception as error:
        logger.warning("%s failed mid-stream: %r", call.id, error)
        yield sse(generation_error(error).body())
    finally:
        await close_quietly(events)
        await close_quietly(stream)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the response ends.

    Starlette stops iterating when the client disconnects but leaves the async generator suspended
    for the garbage collector; closing it here runs its `finally` (closing the generate stream) now.
    A disconnect noticed by a failed send (ASGI spec 2.4 servers) ends the response quietly.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # an ASGI 2.4 server failed a send: the client is gone, nobody to tell
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chunk_payload(chunk: ChatCompletionChunk | CompletionResponse, include_usage: bool) -> dict[str, Any]:
    """OpenAI's chunk shape: delta keys only when set; `usage` (null until the last chunk) only if asked for."""
    payload = chunk.model_dump(mode="json")
    for choice in payload["choices"]:
        if "delta" in choice:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
    if not include_usage:
        payload.pop("usage")
    if payload["mixquant"] is None:
        payload.pop("mixquant")
    drop_absent_token_ids(payload)
    return payload


def completion_payload(response: CompletionResponse) -> dict[str, Any]:
    """A non-streaming completion's JSON: OpenAI's shape, `token_ids` only where asked for."""
    return drop_absent_token_ids(response.model_dump(mode="json"))


def drop_absent_token_ids(payload: dict[str, Any]) -> dict[str, Any]:
    for choice in payload["choices"]:
        if choice.get("token_ids", 0) is None:
            choice.pop("token_ids")
    return payload


def chat_chunk_event(
    call: Call, delta: ChatDelta, finish_reason: str | None = None, mixquant: MixquantStats | None = None
) -> str:
    chunk = ChatCompletionChunk(
        id=call.id,
        created=call.created,
        model=call.model,
        choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
        mixquant=mixquant,
    )
    return sse(chunk_payload(chunk, call.include_usage))


def completion_chunk_event(
    call: Call, text: str, finish_reason: str | None, mixquant: MixquantStats | None = None,
    token_ids: list[int] | None = None,
) -> str:
    chunk = CompletionResponse(
        id=call.id,
        created=call.created,
        model=call.model,
        choices=[CompletionChoice(text=text, finish_reason=finish_reason, token_ids=token_ids)],
        mixquant=mixquant,
    )
    return sse(chunk_payload(chunk, call.include_usage))


# ---------------------------------------------------------------------------------------------- apps


def install_error_handlers(app: FastAPI) -> None:
    """ApiError becomes its response; unknown routes, wrong methods and unexpected failures get OpenAI's body too."""

    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=None).response()

    async def api_error(request: Request, error: ApiError) -> Response:
        return error.response()

    async def client_gone(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def unexpected_error(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(error).__name__}", kind="server_error").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, client_gone)
    app.add_exception_handler(Exception, unexpected_error)


def build_fastapi_app(server: OpenAIServer) -> FastAPI:
    """The server's routes as a FastAPI app (for uvicorn and tests; Serve uses `router_deployment`)."""
    app = FastAPI(title="mixquant-serve", docs_url=None, redoc_url=None)
    for route in server.routes():
        app.add_api_route(route.path, getattr(server, route.handler), methods=[route.method])
    install_error_handlers(app)
    install_openapi(app)
    return app


def decode_handle_generate(decode_handle: Any) -> GenerateFn:
    """`generate` over a DecodeWorker deployment handle: a streaming `generate.remote(request)` call.

    Needs from the handle only `options(stream=True).generate.remote(GenerateRequest)`, returning an
    async iterator of GenerateChunk with `cancel()` (Serve's DeploymentResponseGenerator). Closing the
    returned generator before the final chunk cancels the call, which cancels the worker's generator.
    """
    streaming = decode_handle.options(stream=True)

    async def generate(request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        response = streaming.generate.remote(request)
        finished = False
        try:
            async for chunk in response:
                finished = chunk.finished
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                response.cancel()

    return generate


def load_tokenizer(model: str, cache_dir: str | None = None) -> Tokenizer | None:
    """The model's tokenizer (None for synthetic models); a picklable factory for the Serve Router."""
    from mixquant_serve.model.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(model, cache_dir=Path(cache_dir) if cache_dir else None, progress=False)
    return Tokenizer(checkpoint.tokenizer_dir) if checkpoint.tokenizer_dir is not None else None


def pool_loads(decode_handle: Any, prefill_handle: Any) -> Callable[[], Awaitable[dict]]:
    """A stats hook: `load()` of one decode and one prefill replica (exact with one replica a pool); no prefill
    entry when `prefill_handle` is None (an app without a prefill pool)."""

    async def stats() -> dict:
        if prefill_handle is None:  # co-located serving: no prefill pool
            return {"decode": await decode_handle.load.remote()}
        decode, prefill = await asyncio.gather(decode_handle.load.remote(), prefill_handle.load.remote())
        return {"decode": decode, "prefill": prefill}

    return stats


def router_deployment() -> Any:
    """The Ray Serve ingress deployment `Router`, built on call so that importing this module needs no Ray.

    Bind it as `router_deployment().options(...).bind(decode_app, tokenizer_factory, settings, prefill_app)`:
    `decode_app` is the bound DecodeWorker (Serve passes the replica a DeploymentHandle), and
    `tokenizer_factory()` (e.g. `functools.partial(load_tokenizer, model, cache_dir)`) runs in the
    replica. The handlers are the OpenAIServer's, mounted as a FastAPI class-based view. With
    `prefill_app` (None for an app without a prefill pool), GET /stats reports one replica of each pool
    (`load()`: KV blocks in use, queues).
    """
    from ray import serve

    from mixquant_serve.dashboard.collector import serve_replica_metrics, start_serve_reporting
    from mixquant_serve.dashboard.routes import collector_snapshot, mount_dashboard
    from mixquant_serve.metrics import InflightCounter, timed_generate

    app = FastAPI(title="mixquant-serve", docs_url=None, redoc_url=None)

    class Router:
        def __init__(self, decode: Any, tokenizer_factory: Callable[[], Tokenizer | None], settings: ServerSettings,
                     prefill: Any = None):
            stats = pool_loads(decode, prefill)
            metrics, inflight = serve_replica_metrics("router", settings.model_name, ""), InflightCounter()
            generate = timed_generate(decode_handle_generate(decode), metrics, inflight)  # TTFT, ITL, E2E
            self.server = OpenAIServer(tokenizer_factory(), generate, settings, stats)
            self.metrics_reporter = start_serve_reporting(metrics, inflight.load)  # to the dashboard's collector

        async def stats(self, request: Request) -> Response:
            return await self.server.stats(request)

        async def chat_completions(self, request: Request) -> Response:
            return await self.server.chat_completions(request)

        async def completions(self, request: Request) -> Response:
            return await self.server.completions(request)

        async def models(self, request: Request) -> Response:
            return await self.server.models(request)

        async def health(self, request: Request) -> Response:
            return await self.server.health(request)

    for route in (*ROUTES, STATS_ROUTE):
        app.add_api_route(route.path, getattr(Router, route.handler), methods=[route.method])
    mount_dashboard(app, collector_snapshot())  # GET /dashboard and /dashboard/api/metrics (cluster-wide)
    install_error_handlers(app)
    install_openapi(app)
    return serve.deployment(serve.ingress(app)(Router))

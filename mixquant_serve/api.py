"""OpenAI-compatible HTTP schemas: requests, responses, SSE chunks, errors, and sampling conversion.

Request policy (what a client may send):

* Every OpenAI field this server implements is declared and typed: model, messages, tools,
  tool_choice, parallel_tool_calls, stream, stream_options.include_usage, max_tokens,
  max_completion_tokens, temperature, top_p, seed, stop, n; for /v1/completions also prompt, echo,
  suffix, best_of. Extensions, as vLLM names them: `top_k` (0 disables it); `ignore_eos` (keep
  generating past the end-of-sequence token, for benchmarks); on /v1/completions `return_token_ids`
  (each choice, and each streamed event, carries the output's token ids: the only way to read the
  output of a model without a tokenizer, such as `synthetic:` ones).
* OpenAI fields that clients commonly send but this server does not implement are declared too, so
  that their *neutral* value passes and any other value is a 400 naming the field: n (1 only),
  logprobs (false/null), top_logprobs (0/null), presence_penalty and frequency_penalty (0 only),
  logit_bias (empty only), response_format ({"type": "text"} only), echo (false), suffix (null),
  best_of (1), tool_choice "required" or a named function (they need constrained decoding, which
  this server does not do: a prompt cannot force a call, so they are refused rather than ignored).
* `user` (an end-user id for the caller's abuse monitoring) and a message's `name` are accepted and
  do not change the output; `name` is not rendered by the chat templates this server uses.
* Any other key is a 400 "Unrecognized request argument supplied: KEY", as the OpenAI API answers.

Messages: system (or developer, its newer OpenAI name; rendered as system), user, assistant (with
optional tool_calls, whose arguments must be a JSON object encoded as a string) and tool (with
tool_call_id). Content is a string or a list of text parts, joined with "\\n"; image, audio and file
parts are a 400 (the served models read text only).

Responses follow the OpenAI shapes, plus a `mixquant` object (`MixquantStats`: where the prompt was
prefilled, with which precision, how many tokens came from each pool's prefix cache, how many KV
bytes moved and how long each phase took) on non-streaming responses and on the streaming chunk
that carries the finish_reason. `usage.prompt_tokens_details.cached_tokens` counts the prompt
tokens whose KV was not recomputed: the prefill pool's cache hits for a remote prefill, the decode
replica's for a local one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.protocol import RequestStats

MAX_STOP_SEQUENCES = 16
MESSAGE_ROLE_TAGS = ("system", "developer", "user", "assistant", "tool")
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"


class RequestModel(BaseModel):
    """Base of everything a client sends: unknown keys are errors; NaN and infinities are not numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- messages


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


def _only_text_parts(content: Any) -> Any:
    """Refuses image/audio/file parts by name before the union reports a confusing type mismatch."""
    if isinstance(content, list):
        for position, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(
                    f"content part {position} has type {kind!r}; only 'text' parts are supported (text-only model)"
                )
    return content


TextContent = Annotated[Union[str, list[TextPart]], BeforeValidator(_only_text_parts)]


def flatten_content(content: str | list[TextPart] | None) -> str | None:
    """A message's text: the string itself, or its text parts joined with newlines."""
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


class SystemMessage(RequestModel):
    role: Literal["system", "developer"]
    content: TextContent
    name: str | None = None


class UserMessage(RequestModel):
    role: Literal["user"]
    content: TextContent
    name: str | None = None


class FunctionCall(RequestModel):
    name: str = Field(min_length=1)
    arguments: str  # JSON text of an object, as the OpenAI API sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"must be a JSON object encoded as a string: {error}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"must be a JSON object encoded as a string, got a JSON {type(parsed).__name__}")
        return arguments


class ToolCallIn(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(RequestModel):
    role: Literal["assistant"]
    content: TextContent | None = None
    tool_calls: list[ToolCallIn] | None = None
    name: str | None = None
    refusal: str | None = None  # echoed back by clients that resend a previous response message

    @model_validator(mode="after")
    def _has_content_or_calls(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(RequestModel):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


def template_message(message: SystemMessage | UserMessage | AssistantMessage | ToolMessage) -> dict[str, Any]:
    """The message as `Tokenizer.render_chat` takes it (developer becomes system; parts become one string)."""
    role = "system" if message.role == "developer" else message.role
    rendered: dict[str, Any] = {"role": role, "content": flatten_content(message.content)}
    if isinstance(message, AssistantMessage) and message.tool_calls:
        rendered["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if isinstance(message, ToolMessage):
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


# ---------------------------------------------------------------------------------------------- tools


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


# ---------------------------------------------------------------------------------------------- requests


class StreamOptions(RequestModel):
    include_usage: bool = False


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(RequestModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        if len(strings) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop strings, got {len(strings)}")
        return stop

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, penalty: float | None) -> float | None:
        if penalty:
            raise ValueError(f"not implemented; only 0 is accepted, got {penalty}")
        return penalty

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("not implemented; only an empty object is accepted")
        return bias

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The client's output limit (None: not given) and the name of the field it came from."""
        return self.max_tokens, "max_tokens"


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    @field_validator("tool_choice")
    @classmethod
    def _no_forced_calls(cls, choice: Any) -> Any:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            shown = repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"
            raise ValueError(f"{shown} needs constrained decoding, which this server does not do; use 'auto' or 'none'")
        return choice

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | None) -> bool | None:
        if logprobs:
            raise ValueError("not implemented; only false is accepted")
        return logprobs

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, top: int | None) -> int | None:
        if top:
            raise ValueError("logprobs are not implemented; only 0 is accepted")
        return top

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, response_format: ResponseFormat | None) -> ResponseFormat | None:
        if response_format is not None and response_format.type != "text":
            raise ValueError(f"type {response_format.type!r} is not implemented; only 'text' is accepted")
        return response_format

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_output_limit(cls, limit: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if limit is not None and max_tokens is not None and limit != max_tokens:
            raise ValueError(f"{limit} disagrees with max_tokens={max_tokens}; send one of them")
        return limit

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def uses_tools(self) -> bool:
        """Tools are rendered into the prompt and parsed out of the output unless tool_choice is 'none'."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_messages(self) -> list[dict[str, Any]]:
        return [template_message(message) for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.uses_tools else None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    return_token_ids: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("must not be empty")
            if isinstance(prompt[0], str) and len(prompt) != 1:
                raise ValueError(f"batches are not supported: send one prompt string, got {len(prompt)}")
        return prompt

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: int | None) -> int | None:
        if logprobs:
            raise ValueError("not implemented; only null or 0 is accepted")
        return logprobs

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("not implemented; only false is accepted")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not implemented; only null is accepted")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of != 1:
            raise ValueError(f"only best_of=1 is supported, got {best_of}")
        return best_of


def sampling_params(request: SamplingFields, max_tokens: int) -> SamplingParams:
    """The engine's sampling parameters; OpenAI defaults (temperature 1, top_p 1) where the client sent none."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        seed=request.seed,
        stop=request.stop_strings,
        ignore_eos=bool(request.ignore_eos),
    )


# ---------------------------------------------------------------------------------------------- responses


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(ResponseModel):
    cached_tokens: int


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class MixquantStats(ResponseModel):
    """`RequestStats` of the request, as the decode worker reported it."""

    prefill: Literal["remote", "local"]
    prefill_precision: str
    cached_tokens_prefill: int
    cached_tokens_decode: int
    kv_transfer_bytes: int
    kv_transfer_ms: float
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    fallback_reason: str | None
    decode_replica: str | None = None

    @classmethod
    def from_stats(cls, stats: RequestStats) -> "MixquantStats":
        return cls(**asdict(stats))


def usage_of(num_prompt_tokens: int, num_output_tokens: int, stats: RequestStats | None) -> Usage:
    cached = 0
    if stats is not None:
        cached = stats.cached_tokens_prefill if stats.prefill == "remote" else stats.cached_tokens_decode
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_output_tokens,
        total_tokens=num_prompt_tokens + num_output_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(ResponseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    mixquant: MixquantStats | None


class ToolCallDelta(ResponseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatDelta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(ResponseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseModel):
    """One SSE event. Serialized with exclude_none, except that finish_reason and usage stay when null."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    mixquant: MixquantStats | None = None


class CompletionChoice(ResponseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = None  # with return_token_ids only (left out of the JSON otherwise)


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    mixquant: MixquantStats | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixquant-serve"
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorBody


# ---------------------------------------------------------------------------------------------- errors


def describe_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """A client-facing message naming each bad field, and the first bad field (OpenAI's `param`).

    Pydantic reports one error per union member (e.g. content as str *and* as a list of parts) and
    puts union labels and discriminator tags into the location; the member whose error lies deepest
    is the one the client meant, so each union reports only that one.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in error.errors():
        groups.setdefault(_union_key(item["loc"]), []).append(item)
    messages: list[str] = []
    params: list[str] = []
    for items in groups.values():
        deepest = max(len(item["loc"]) for item in items)
        chosen = [item for item in items if len(item["loc"]) == deepest]
        path = _field_path(chosen[0]["loc"])
        if chosen[0]["type"] == "extra_forbidden" and len(chosen[0]["loc"]) == 1:
            messages.append(f"Unrecognized request argument supplied: {path}")
        else:
            texts = list(dict.fromkeys(_clean_message(item["msg"]) for item in chosen))
            messages.append(f"{path}: {', or '.join(texts)}" if path else ", or ".join(texts))
        params.append(path)
    return "; ".join(messages), (params[0] or None) if params else None


def _is_union_label(loc: tuple[Any, ...], index: int) -> bool:
    item = loc[index]
    if not isinstance(item, str):
        return False
    if "[" in item or item in ("str", "int", "float", "bool", "dict", "list", "none") or item[:1].isupper():
        return True
    # the role of a message: Pydantic puts the discriminator's tag after messages[i]
    return index >= 2 and loc[index - 2] == "messages" and isinstance(loc[index - 1], int) and item in MESSAGE_ROLE_TAGS


def _union_key(loc: tuple[Any, ...]) -> str:
    """The field path up to the first union label that is not a message's role tag."""
    for index in range(len(loc)):
        item = loc[index]
        if _is_union_label(loc, index) and item not in MESSAGE_ROLE_TAGS:
            return _field_path(loc[:index])
    return _field_path(loc)


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for index, item in enumerate(loc):
        if _is_union_label(loc, index):
            continue
        path += f"[{item}]" if isinstance(item, int) else (f".{item}" if path else str(item))
    return path


def _clean_message(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message

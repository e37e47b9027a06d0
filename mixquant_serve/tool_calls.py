"""Tool calls in generated text: Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.

The chat template asks the model to answer a tool-using request with one such block per call (see
`mixquant_serve.model.tokenizer`). `parse_tool_calls` turns a finished output into OpenAI tool
calls plus the text outside the blocks; `ToolCallStreamFilter` does the same for a stream.

Rules:
* Output is a tool-call answer only if every block parses: a JSON object with a string "name" and
  "arguments" that is an object (or a string holding one). Anything else (broken JSON, a missing
  name) leaves the whole output as plain content: the client sees what the model wrote.
* A final block without its closing tag counts only when the model itself ended the output
  (finish_reason "stop": small models often stop right after the JSON); a block cut off by
  max_tokens is not a call.
* Names are not checked against the request's tools: an agent loop answers an unknown tool with an
  error message, which is more useful to the model than text it did not mean as prose.
* Streaming: text is forwarded until a `<tool_call>` tag starts; from there on everything is held
  back (as is a trailing partial tag such as "<tool_c"), because a block's JSON is not content. At
  the end the held text is either tool calls (plus any non-blank text around the blocks) or, if it
  does not parse, content after all.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from mixquant_serve.model.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI's API returns it


@dataclass(frozen=True)
class ParsedOutput:
    content: str  # the text outside the tool-call blocks (all of it when there are no calls)
    tool_calls: list[ToolCall]


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, model_stopped: bool) -> ParsedOutput:
    """Splits `text` into content and tool calls; no calls unless every block parses (module docstring)."""
    outside: list[str] = []
    calls: list[ToolCall] = []
    position = 0
    while (start := text.find(TOOL_CALL_OPEN, position)) >= 0:
        outside.append(text[position:start])
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        if end < 0 and not model_stopped:
            return ParsedOutput(text, [])
        body = text[body_start:] if end < 0 else text[body_start:end]
        call = _parse_block(body)
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
        position = len(text) if end < 0 else end + len(TOOL_CALL_CLOSE)
    outside.append(text[position:])
    return ParsedOutput("".join(outside), calls) if calls else ParsedOutput(text, [])


def _parse_block(body: str) -> ToolCall | None:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"]:
        return None
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_tool_call_id(), payload["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStreamFilter:
    """Forwards streamed text that cannot belong to a tool-call block; settles the rest at the end."""

    def __init__(self) -> None:
        self.text = ""
        self.emitted = 0  # text[:emitted] has been forwarded as content

    def push(self, delta: str) -> str:
        """Adds generated text; returns the part that is safe to forward as content now."""
        self.text += delta
        start = self.text.find(TOOL_CALL_OPEN, max(0, self.emitted - len(TOOL_CALL_OPEN)))
        safe_end = start if start >= 0 else len(self.text) - _partial_tag_suffix(self.text, TOOL_CALL_OPEN)
        if safe_end <= self.emitted:
            return ""
        forwarded = self.text[self.emitted : safe_end]
        self.emitted = safe_end
        return forwarded

    def finish(self, model_stopped: bool) -> tuple[str, list[ToolCall]]:
        """At the end of the stream: the content still to forward and the tool calls."""
        parsed = parse_tool_calls(self.text, model_stopped)
        if not parsed.tool_calls:
            return self.text[self.emitted :], []
        # text[:emitted] precedes the first block, so it is a prefix of the outside text
        rest = parsed.content[self.emitted :]
        return (rest if rest.strip() else ""), parsed.tool_calls


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0

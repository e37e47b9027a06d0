"""Tokenizer: text <-> token ids, chat templates with tool calling, and streaming detokenization.

`Tokenizer` wraps a transformers tokenizer loaded offline from a checkpoint's `tokenizer_dir`.

Chat templates and tools. A template that handles tools itself (Qwen3, Llama 3.1: its source
mentions `tools`) receives them unchanged, and so do assistant `tool_calls` and `tool` messages when
the template mentions them. A template that does not (SmolLM2's renders only role + content) gets
the Hermes format that Qwen2.5 uses, spelled out in the messages before the template sees them:

  * the tool list goes into the system message (appended to the caller's system message, or to the
    template's own default system prompt when the conversation has none, which the template would
    otherwise have dropped once a system message exists):

        # Tools

        You may call one or more functions to assist with the user query.

        You are provided with function signatures within <tools></tools> XML tags:
        <tools>
        {"type": "function", "function": {"name": "get_weather", ...}}
        </tools>

        For each function call, return a json object with function name and arguments within
        <tool_call></tool_call> XML tags:
        <tool_call>
        {"name": <function-name>, "arguments": <args-json-object>}
        </tool_call>

  * an assistant message's `tool_calls` are appended to its content, one block each:
    `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>`;
  * `tool` messages become a user turn (consecutive ones share it), each result wrapped as
    `<tool_response>\n...\n</tool_response>`: the model reads tool output as input, not as its own words.

Messages use the OpenAI chat shape: {"role": "system"|"user"|"assistant"|"tool", "content": str}, with
optional "tool_calls": [{"id": ..., "type": "function", "function": {"name": str, "arguments": dict or
JSON string}}] on assistant messages (content may then be None) and "tool_call_id" on tool messages.
Tools use the OpenAI shape {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}.

`IncrementalDecoder` turns a stream of token ids into text deltas without ever emitting the
replacement character for a UTF-8 sequence that later tokens complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

CHATML_END_OF_TURN = "<|im_end|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_SYSTEM_SECTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tool_lines}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

ROLES = ("system", "user", "assistant", "tool")
_REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence
_MARKER = "\x00mixquant-marker\x00"  # probe text for finding the template's default system prompt


class Tokenizer:
    """A transformers tokenizer loaded offline, plus the chat-template and tool handling above."""

    def __init__(self, tokenizer_dir: Path) -> None:
        from transformers import AutoTokenizer

        if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
            raise ValueError(f"tokenizer_dir={tokenizer_dir!r} is not a folder (synthetic checkpoints have none)")
        self.tokenizer_dir = Path(tokenizer_dir)
        self._hf = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
        template = self._hf.chat_template
        if not isinstance(template, str):
            raise ValueError(f"tokenizer_dir={str(tokenizer_dir)!r}: the tokenizer has no (single) chat template")
        self.chat_template: str = template
        # What the template renders by itself; the rest is spelled out in the messages (module docstring).
        self.template_handles_tools = re.search(r"\btools\b", template) is not None
        self.template_handles_tool_calls = re.search(r"\btool_calls\b", template) is not None
        self.template_handles_tool_role = re.search(r"""['"]tool['"]""", template) is not None
        self.eos_token_ids: list[int] = self._find_eos_token_ids()
        self.default_system_prompt: str | None = self._find_default_system_prompt()

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return len(self._hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone: no BOS/EOS added (a chat template writes its own)."""
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (end of turn, BOS) are dropped unless asked for."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` (and `tools`), ending with the assistant header if asked."""
        prepared = _validate_messages(messages)
        tools = _validate_tools(tools)
        if tools and not self.template_handles_tools:
            prepared = self._with_tools_in_system_message(prepared, tools)
        if not self.template_handles_tool_calls:
            prepared = [_inline_tool_calls(message) for message in prepared]
        if not self.template_handles_tool_role:
            prepared = _tool_messages_as_user_turns(prepared)
        template_tools = tools if (tools and self.template_handles_tools) else None
        return self._hf.apply_chat_template(
            prepared, tools=template_tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of `render_chat(...)`; special tokens come from the template text, none are added."""
        return self.encode(self.render_chat(messages, tools, add_generation_prompt))

    def _find_eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS, generation_config.json's eos_token_id(s), and <|im_end|> for ChatML templates."""
        candidates: list[int] = []
        if self._hf.eos_token_id is not None:
            candidates.append(int(self._hf.eos_token_id))
        generation_config = self.tokenizer_dir / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
            candidates.extend(int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        if CHATML_END_OF_TURN in self.chat_template:
            end_of_turn = self._hf.convert_tokens_to_ids(CHATML_END_OF_TURN)
            if end_of_turn is not None and end_of_turn != self._hf.unk_token_id:
                candidates.append(int(end_of_turn))
        return list(dict.fromkeys(candidates))

    def _find_default_system_prompt(self) -> str | None:
        """The system prompt the template inserts when a conversation has none, or None if it inserts none.

        Renders [system=MARKER, user] and [user]: if the second equals the first with MARKER replaced by
        some text, that text is the default system prompt.
        """
        from jinja2 import TemplateError

        user = {"role": "user", "content": "hi"}
        try:
            with_system = self._hf.apply_chat_template(
                [{"role": "system", "content": _MARKER}, user], add_generation_prompt=False, tokenize=False
            )
            without_system = self._hf.apply_chat_template([user], add_generation_prompt=False, tokenize=False)
        except TemplateError:  # e.g. a template that refuses system messages: then it has no default either
            return None
        if with_system.count(_MARKER) != 1:
            return None
        before, after = with_system.split(_MARKER)
        fits = without_system.startswith(before) and without_system.endswith(after)
        if not fits or len(without_system) < len(before) + len(after):
            return None
        default = without_system[len(before) : len(without_system) - len(after)]
        return default or None

    def _with_tools_in_system_message(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        tool_lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        section = TOOLS_SYSTEM_SECTION.format(tool_lines=tool_lines)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"]
            rest = messages[1:]
        else:
            system = self.default_system_prompt or ""
            rest = messages
        content = f"{system}\n\n{section}" if system else section
        return [{"role": "system", "content": content}, *rest]


class IncrementalDecoder:
    """Streams text for a growing list of token ids: `push` returns only newly completed text.

    Each push re-decodes a short window (tokens since the last emitted text, plus the tokens of the
    previous emission as left context, so tokenizers that treat a leading space specially decode
    consistently) and emits the new suffix, unless it ends in U+FFFD, meaning a multi-byte UTF-8
    character is still incomplete: then it waits for the next token. The concatenation of all
    pushes plus `flush()` equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (left context already emitted)
        self._read_offset = 0  # ids before this index have been emitted as text
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Returns whatever is still held back (an incomplete character decodes as U+FFFD); end of stream."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(emitted) or (window.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        delta = window[len(emitted) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._chunks.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""


def _validate_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks the OpenAI message shape; returns shallow copies with tool-call arguments as dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role={role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and role != "assistant":
            raise ValueError(f"messages[{index}]: only assistant messages carry tool_calls, not {role!r}")
        if not isinstance(content, str) and not (content is None and tool_calls):
            raise ValueError(
                f"messages[{index}].content must be a string (None only for an assistant message with tool_calls)"
            )
        copy = dict(message)
        if tool_calls is not None:
            copy["tool_calls"] = [_validate_tool_call(index, position, call) for position, call in enumerate(tool_calls)]
        prepared.append(copy)
    return prepared


def _validate_tool_call(index: int, position: int, call: Any) -> dict[str, Any]:
    where = f"messages[{index}].tool_calls[{position}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must look like {{'type': 'function', 'function': {{'name': str, 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {error}") from error
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {type(arguments).__name__}")
    return {**call, "function": {**function, "arguments": arguments}}


def _validate_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} dicts or None")
    for position, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{position}] must look like {{'type': 'function', 'function': {{'name': ...}}}}")
        if not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{position}].function.name must be a string")
    return tools


def _inline_tool_calls(message: dict[str, Any]) -> dict[str, Any]:
    """Assistant tool_calls -> Hermes <tool_call> blocks appended to the content."""
    if not message.get("tool_calls"):
        return message
    blocks = [
        TOOL_CALL_OPEN
        + "\n"
        + json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]}, ensure_ascii=False)
        + "\n"
        + TOOL_CALL_CLOSE
        for call in message["tool_calls"]
    ]
    parts = ([message["content"]] if message.get("content") else []) + blocks
    return {"role": "assistant", "content": "\n".join(parts)}


def _tool_messages_as_user_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run of consecutive tool messages -> one user turn of <tool_response> blocks."""
    converted: list[dict[str, Any]] = []
    previous_was_tool = False
    for message in messages:
        is_tool = message["role"] == "tool"
        if is_tool:
            block = f"{TOOL_RESPONSE_OPEN}\n{message['content']}\n{TOOL_RESPONSE_CLOSE}"
            if previous_was_tool:
                converted[-1]["content"] += "\n" + block
            else:
                converted.append({"role": "user", "content": block})
        else:
            converted.append(message)
        previous_was_tool = is_tool
    return converted

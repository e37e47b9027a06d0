"""Exact-match scoring of an answer, after a normalization that forgives only formatting.

The model's completion is the decoded text it generated after the prompt (which ends with the item's
response prefix), special tokens dropped, cut at the first newline. Decoding stops at a newline, and
for a value answer whose prefix opened a quote also at the closing quote (`stop_strings`).

value answers (lookup, most multi-turn items): every value prefix ends in an opening quote, so the
  answer is the completion up to the closing quote (or the whole completion when there is none);
  normalize_value then strips surrounding whitespace, one trailing '.', ',' or ';', and collapses
  inner whitespace; letters compare case-insensitively. Correct iff the normalized texts are equal.

tool_call answers: the call is response_prefix + completion from just after "<tool_call>" up to
  "</tool_call>" (or the end). It must parse as a JSON object {"name": str, "arguments": object};
  arguments given as a JSON string are parsed (both OpenAI forms). Correct iff the name is equal and
  the arguments are equal as parsed JSON (same keys, same values and JSON types: "1", 1 and 1.0 all
  differ; key order is free).
"""

from __future__ import annotations

import json
import re
from typing import Any

from mixquant_serve.eval.suite import EvalItem
from mixquant_serve.model.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_WHITESPACE = re.compile(r"\s+")


def stop_strings(item: EvalItem) -> tuple[str, ...]:
    """Where decoding of the item's answer may stop: past these strings nothing more is scored."""
    if item.answer_kind == "value" and item.response_prefix.endswith('"'):
        return ("\n", '"')
    return ("\n",)


def completion_text(generated: str) -> str:
    """The scored part of the generated text: everything before the first newline."""
    return generated.split("\n", 1)[0]


def extract_value(completion: str, response_prefix: str) -> str:
    """The value a completion gives: up to the closing quote when the prefix opened one."""
    if response_prefix.endswith('"'):
        return completion.split('"', 1)[0]
    return completion


def normalize_value(text: str) -> str:
    text = _WHITESPACE.sub(" ", text).strip()
    if text[-1:] in (".", ",", ";"):
        text = text[:-1].rstrip()
    return text.casefold()


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """{"name": str, "arguments": dict} from the text of a Hermes <tool_call> block, or None if it is not one."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return None
    body = text[start + len(TOOL_CALL_OPEN) :]
    body = body.split(TOOL_CALL_CLOSE, 1)[0].strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": arguments}


def is_correct(item: EvalItem, generated: str) -> bool:
    """Whether the generated text (decoded, special tokens dropped) answers the item exactly."""
    completion = completion_text(generated)
    if item.answer_kind == "value":
        return normalize_value(extract_value(completion, item.response_prefix)) == normalize_value(item.answer)
    if item.answer_kind == "tool_call":
        expected = parse_tool_call(TOOL_CALL_OPEN + "\n" + item.answer)
        if expected is None:
            raise ValueError(f"item {item.item_id}: answer is not a tool call: {item.answer!r}")
        return _canonical(parse_tool_call(item.response_prefix + completion)) == _canonical(expected)
    raise ValueError(f"item {item.item_id}: answer_kind must be 'value' or 'tool_call', got {item.answer_kind!r}")


def _canonical(call: dict[str, Any] | None) -> str | None:
    """JSON text with sorted keys: equal iff the calls are equal values of equal JSON types."""
    return None if call is None else json.dumps(call, sort_keys=True, ensure_ascii=False)

"""The quality suite's shape: groups of items sharing one long agent transcript, stored as JSON lines.

    EvalGroup (one JSON line)                       items of the group (in the same line)
      tools      declared to the chat template        EvalItem
      context    system, earlier tool calls and         turns            messages after the context,
                 their results, one long tool result                     ending with a user message
                 (1K-6K tokens)                         response_prefix  start of the assistant's answer
                                                        answer_kind      "value" or "tool_call"
                                                        answer           the exact expected answer

An item's prompt is the chat template of context + turns (with the group's tools) followed by the
response prefix. All items of a group start with the same context, so its KV is computed once per
prefill precision and shared, as a serving prefix cache shares an agent session's history.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from mixquant_serve.model.tokenizer import Tokenizer

Family = Literal["lookup", "tool_call", "multi_turn"]
AnswerKind = Literal["value", "tool_call"]
FAMILIES: tuple[Family, ...] = get_args(Family)
ANSWER_KINDS: tuple[AnswerKind, ...] = get_args(AnswerKind)


@dataclass(frozen=True)
class EvalItem:
    item_id: str
    family: Family
    skill: str  # what the item asks for, e.g. "lookup-key", "call-delete", "recall-ticket"
    turns: list[dict[str, Any]]  # OpenAI-shape messages after the group's context; the last is a user message
    response_prefix: str  # the assistant's answer starts with this text (part of the prompt)
    answer_kind: AnswerKind
    answer: str  # a value, or the JSON of {"name": ..., "arguments": {...}} for a tool call


@dataclass(frozen=True)
class EvalGroup:
    group_id: str
    domain: str
    tools: list[dict[str, Any]]  # OpenAI-shape tool declarations
    context: list[dict[str, Any]]  # messages every item of the group starts with
    tool_result_tokens: int  # tokens of the long tool result in the context
    items: list[EvalItem]


def context_token_ids(tokenizer: Tokenizer, group: EvalGroup) -> list[int]:
    """Tokens of the group's shared transcript (no generation prompt): a prefix of every item's prompt."""
    return tokenizer.apply_chat_template(group.context, group.tools, add_generation_prompt=False)


def prompt_token_ids(tokenizer: Tokenizer, group: EvalGroup, item: EvalItem) -> list[int]:
    """Tokens of the item's prompt: context + turns in the chat template, then the response prefix."""
    text = tokenizer.render_chat([*group.context, *item.turns], group.tools, add_generation_prompt=True)
    return tokenizer.encode(text + item.response_prefix)


def suite_to_jsonl(groups: list[EvalGroup]) -> str:
    """One canonical JSON line per group (sorted keys): equal suites give equal text."""
    return "".join(json.dumps(asdict(group), sort_keys=True, ensure_ascii=False) + "\n" for group in groups)


def suite_sha256(groups: list[EvalGroup]) -> str:
    return hashlib.sha256(suite_to_jsonl(groups).encode("utf-8")).hexdigest()


def write_suite(groups: list[EvalGroup], path: Path) -> None:
    Path(path).write_text(suite_to_jsonl(groups), encoding="utf-8")


def read_suite(path: Path) -> list[EvalGroup]:
    """Groups from a JSON-lines suite file; ValueError names the line that does not fit the shape."""
    groups = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            items = [_item_from_dict(item) for item in raw.pop("items")]
            groups.append(EvalGroup(**raw, items=items))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"suite file {path}, line {number}: not an EvalGroup ({error})") from error
    if not groups:
        raise ValueError(f"suite file {path} holds no groups")
    return groups


def select_items(groups: list[EvalGroup], limit: int | None) -> list[EvalGroup]:
    """The first `limit` items in suite order (groups keep their context; empty groups are dropped)."""
    if limit is None:
        return groups
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    selected: list[EvalGroup] = []
    remaining = limit
    for group in groups:
        if remaining == 0:
            break
        items = group.items[:remaining]
        remaining -= len(items)
        selected.append(EvalGroup(group.group_id, group.domain, group.tools, group.context, group.tool_result_tokens, items))
    return selected


def _item_from_dict(raw: dict[str, Any]) -> EvalItem:
    item = EvalItem(**raw)
    if item.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {item.family!r}")
    if item.answer_kind not in ANSWER_KINDS:
        raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}, got {item.answer_kind!r}")
    return item

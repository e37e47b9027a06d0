"""Deterministic generator of the agentic long-context suite: a seed in, the same groups out, no downloads.

Each group is one agent session over a domain's key -> value store (domains.py):

    system    role + the domain's five tools (declared through the chat template's tool support)
    user      "List all settings."               assistant <tool_call> list_settings    tool {long JSON, 1K-6K tokens}
    user      "What is the value of "K0"?"       assistant "K0": "V0"
    user      "Delete the setting X."            assistant <tool_call> delete_setting   tool {"ok": true}
    user      "Set the value of Y to Z."         assistant <tool_call> update_setting   tool {"ok": true}
    ---- shared context ends; each item adds its turns ----

The turns after the long result show the answer formats right before the questions (a 135M model
follows a format it has just seen far more reliably than one described in the system prompt).

and its items, `items_per_family` of each family, interleaved (lookup, tool_call, multi_turn, ...):

    lookup      "What is the value of "K"?"                       answer: the value (prefix '"K": "')
    tool_call   delete K / update K to V / get K / history of the record whose value is V / list
                matching K                                       answer: the call  (prefix '<tool_call>\\n{"name": "')
    multi_turn  a first question and its answer, then a follow-up that needs them: repeat a ticket number
                given earlier, repeat the previous answer, delete "that" record, look up the record the
                user asked to keep in mind, set "its" value

Response prefixes put the answer in the form the transcript already uses (a JSON "key": "value" pair,
a Hermes <tool_call>), which keeps answers short and scoreable by exact match. Keys asked about are
spread evenly over the depth of the long result. The generator uses only `random.Random(seed)` and the
tokenizer (to size each tool result to its token target).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixquant_serve.eval.domains import DOMAINS, WORDS, Domain
from mixquant_serve.eval.suite import EvalGroup, EvalItem
from mixquant_serve.model.tokenizer import Tokenizer

DEFAULT_SEED = 0
TOOL_CALL_PREFIX = '<tool_call>\n{"name": "'
SKILLS_PER_FAMILY = 5
MAX_KEY_ATTEMPTS = 10_000  # a domain whose key space is exhausted raises instead of looping


@dataclass(frozen=True)
class SuiteSpec:
    """Sizes of a suite: one group per tool-result token target, items_per_family items of each family per group."""

    tool_result_tokens: tuple[int, ...]
    items_per_family: int

    def __post_init__(self) -> None:
        if not self.tool_result_tokens or min(self.tool_result_tokens) < 1:
            raise ValueError(f"tool_result_tokens must be positive targets, got {self.tool_result_tokens}")
        if not 1 <= self.items_per_family <= SKILLS_PER_FAMILY:
            raise ValueError(
                f"items_per_family must be in [1, {SKILLS_PER_FAMILY}] (one item per skill), got {self.items_per_family}"
            )

    @property
    def num_items(self) -> int:
        return len(self.tool_result_tokens) * 3 * self.items_per_family


# 10 groups x 15 items = 150 items; most tool results 1K-2K tokens, a few up to 5.5K (prompts < 8192).
DEFAULT_SPEC = SuiteSpec(
    tool_result_tokens=(1000, 1100, 1200, 1350, 1500, 1700, 2000, 2500, 3500, 5500),
    items_per_family=5,
)


def generate_suite(tokenizer: Tokenizer, seed: int = DEFAULT_SEED, spec: SuiteSpec = DEFAULT_SPEC) -> list[EvalGroup]:
    """The suite for seed: groups in the order of spec.tool_result_tokens (shortest first in the default)."""
    rng = random.Random(seed)
    return [
        _generate_group(tokenizer, rng, f"g{index:02d}", DOMAINS[index % len(DOMAINS)], target, spec.items_per_family)
        for index, target in enumerate(spec.tool_result_tokens)
    ]


def _generate_group(
    tokenizer: Tokenizer, rng: random.Random, group_id: str, domain: Domain, target_tokens: int, per_family: int
) -> EvalGroup:
    d = domain
    used_keys: set[str] = set()
    used_values: set[str] = set()
    entries, result = _tool_result(tokenizer, rng, d, target_tokens, used_keys, used_values)
    # one asked-about key per slice of the result, so that answers sit at every depth; one more for the demo
    keys = list(entries)
    slices = 3 * per_family + 1
    if len(keys) < slices:
        raise ValueError(f"target_tokens={target_tokens} gives {len(keys)} entries, fewer than the {slices} keys asked")
    asked = [keys[rng.randrange(i * len(keys) // slices, (i + 1) * len(keys) // slices)] for i in range(slices)]
    rng.shuffle(asked)
    demo_key = asked.pop()
    demo_delete_key = _fresh(rng, d.make_key, used_keys)
    demo_update_key = _fresh(rng, d.make_key, used_keys)
    demo_update_value = _fresh(rng, d.make_value, used_values)
    context: list[dict[str, Any]] = [
        {
            "role": "system",
            "content": f"{d.system} Call a tool when the user asks for an action. Answer questions with the exact "
            f"{d.value_noun} from the tool results, nothing else.",
        },
        {"role": "user", "content": f"List all {d.collection}."},
        _call("call_1", d.list_tool, {"query": "all"}),
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "user", "content": f'What is the {d.value_noun} of "{demo_key}"?'},
        _assistant(f'"{demo_key}": "{entries[demo_key]}"'),
        {"role": "user", "content": f"Delete the {d.noun} {demo_delete_key}."},
        _call("call_2", d.delete_tool, {d.key_arg: demo_delete_key}),
        {"role": "tool", "tool_call_id": "call_2", "content": '{"ok": true}'},
        {"role": "user", "content": f"Set the {d.value_noun} of {demo_update_key} to {demo_update_value}."},
        _call("call_3", d.update_tool, {d.key_arg: demo_update_key, d.value_arg: demo_update_value}),
        {"role": "tool", "tool_call_id": "call_3", "content": '{"ok": true}'},
    ]
    lookups = [_lookup_item(d, key, entries[key], skill) for key, skill in zip(asked[0::3], range(per_family))]
    calls = [_call_item(rng, d, key, entries[key], skill, used_values) for key, skill in zip(asked[1::3], range(per_family))]
    follow_ups = [
        _multi_turn_item(rng, d, key, entries[key], skill, used_keys, used_values)
        for key, skill in zip(asked[2::3], range(per_family))
    ]
    items: list[EvalItem] = []
    for lookup, call, follow_up in zip(lookups, calls, follow_ups):
        items.extend([lookup, call, follow_up])
    items = [_with_id(item, f"{group_id}-{index:02d}") for index, item in enumerate(items)]
    return EvalGroup(group_id, d.name, d.tools(), context, len(tokenizer.encode(result)), items)


def _tool_result(
    tokenizer: Tokenizer,
    rng: random.Random,
    domain: Domain,
    target_tokens: int,
    used_keys: set[str],
    used_values: set[str],
) -> tuple[dict[str, str], str]:
    """The long result: a JSON object of the fewest entries whose text reaches target_tokens tokens."""
    entries: dict[str, str] = {}

    def render(count: int) -> str:
        return json.dumps({domain.collection: dict(list(entries.items())[:count])}, indent=1, ensure_ascii=False)

    while len(tokenizer.encode(render(len(entries)))) < target_tokens:
        for _ in range(8):
            entries[_fresh(rng, domain.make_key, used_keys)] = _fresh(rng, domain.make_value, used_values)
    low, high = 1, len(entries)  # smallest count whose rendering reaches the target
    while low < high:
        middle = (low + high) // 2
        if len(tokenizer.encode(render(middle))) >= target_tokens:
            high = middle
        else:
            low = middle + 1
    # draws past the kept count stay in used_keys/used_values: later draws skip them, deterministically
    kept = dict(list(entries.items())[:low])
    return kept, json.dumps({domain.collection: kept}, indent=1, ensure_ascii=False)


def _lookup_item(d: Domain, key: str, value: str, skill: int) -> EvalItem:
    questions = (
        f'What is the {d.value_noun} of the {d.noun} "{key}"?',
        f'Look up "{key}" in the list: what is its {d.value_noun}?',
        f'I need the {d.value_noun} of "{key}".',
        f'Which {d.value_noun} does the {d.noun} "{key}" have?',
        f'Find "{key}" in the tool result and give me its {d.value_noun}.',
    )
    return EvalItem("", "lookup", "lookup-key", [_user(questions[skill])], f'"{key}": "', "value", value)


def _call_item(rng: random.Random, d: Domain, key: str, value: str, skill: int, used_values: set[str]) -> EvalItem:
    if skill == 0:
        request, name, arguments, label = f"Delete the {d.noun} {key}.", d.delete_tool, {d.key_arg: key}, "call-delete"
    elif skill == 1:
        new_value = _fresh(rng, d.make_value, used_values)
        request = f"Set the {d.value_noun} of {key} to {new_value}."
        name, arguments, label = d.update_tool, {d.key_arg: key, d.value_arg: new_value}, "call-update"
    elif skill == 2:
        request, name, arguments, label = f"Read the {d.noun} {key} again.", d.get_tool, {d.key_arg: key}, "call-get"
    elif skill == 3:
        request = f"Show the change history of the {d.noun} whose {d.value_noun} is {value}."
        name, arguments, label = d.history_tool, {d.key_arg: key}, "call-by-value"
    else:
        request = f"List the {d.collection} again, only those matching {key}."
        name, arguments, label = d.list_tool, {"query": key}, "call-list"
    answer = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return EvalItem("", "tool_call", label, [_user(request)], TOOL_CALL_PREFIX, "tool_call", answer)


def _multi_turn_item(
    rng: random.Random, d: Domain, key: str, value: str, skill: int, used_keys: set[str], used_values: set[str]
) -> EvalItem:
    pair = f'"{key}": "{value}"'
    if skill == 0:
        ticket = f"{rng.choice(WORDS).upper()}-{rng.randint(100, 999)}"
        turns = [
            _user(f'My ticket number is {ticket}. What is the {d.value_noun} of "{key}"?'),
            _assistant(pair),
            _user("Which ticket number did I give you?"),
        ]
        return EvalItem("", "multi_turn", "recall-ticket", turns, 'The ticket number you gave me is "', "value", ticket)
    if skill == 1:
        turns = [
            _user(f'What is the {d.value_noun} of "{key}"?'),
            _assistant(pair),
            _user(f"Repeat the {d.value_noun} you just gave me."),
        ]
        return EvalItem("", "multi_turn", "repeat-answer", turns, f'The {d.value_noun} I gave you is "', "value", value)
    if skill == 2:
        turns = [_user(f'What is the {d.value_noun} of "{key}"?'), _assistant(pair), _user(f"Delete that {d.noun}.")]
        answer = json.dumps({"name": d.delete_tool, "arguments": {d.key_arg: key}}, ensure_ascii=False)
        return EvalItem("", "multi_turn", "delete-that", turns, TOOL_CALL_PREFIX, "tool_call", answer)
    if skill == 4:
        new_value = _fresh(rng, d.make_value, used_values)
        turns = [
            _user(f'What is the {d.value_noun} of "{key}"?'),
            _assistant(pair),
            _user(f"Set its {d.value_noun} to {new_value}."),
        ]
        answer = json.dumps({"name": d.update_tool, "arguments": {d.key_arg: key, d.value_arg: new_value}}, ensure_ascii=False)
        return EvalItem("", "multi_turn", "update-that", turns, TOOL_CALL_PREFIX, "tool_call", answer)
    turns = [
        _user(f'Keep the {d.noun} "{key}" in mind, I will ask about it.'),
        _assistant(f'Noted: "{key}".'),
        _user(f"What is the {d.value_noun} of the {d.noun} I asked you to keep in mind?"),
    ]
    prefix = f'The {d.value_noun} of that {d.noun} is "'
    return EvalItem("", "multi_turn", "lookup-remembered", turns, prefix, "value", value)


def _fresh(rng: random.Random, make: Callable[[random.Random], str], used: set[str]) -> str:
    for _ in range(MAX_KEY_ATTEMPTS):
        candidate = make(rng)
        if candidate not in used:
            used.add(candidate)
            return candidate
    raise ValueError(f"the domain ran out of distinct keys/values after {len(used)}: lower the token target")


def _call(call_id: str, name: str, arguments: dict[str, str]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
    }


def _user(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _with_id(item: EvalItem, item_id: str) -> EvalItem:
    return EvalItem(item_id, item.family, item.skill, item.turns, item.response_prefix, item.answer_kind, item.answer)

"""Synthetic multi-turn agent sessions: a growing chat history like an agent loop produces.

    turn 1:  [system: role + tool list] [user: task]                                  -> reply 1
    turn k:  ... [assistant: reply k-1] [user: "Tool `name` returned:" + tool result] -> reply k

Every turn resends the whole history, so a session-affine server finds all but the newest tool
result and reply in its prefix cache. Tool results are deterministic pseudo-random JSON records of
about `tool_result_tokens` tokens (estimated at TOKENS_PER_RECORD each), seeded per session, so a
run can be repeated. Tools are described in the system prompt's text (not the `tools` field), so
the model answers in plain text whatever its chat template supports. `TokenAgentSession` is the
same loop in token ids, for models without a tokenizer (synthetic weights for speed runs).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

TOOLS = (
    ("search_logs", "Search the service logs. Arguments: query (string), since (ISO time)."),
    ("query_metrics", "Read a time series. Arguments: metric (string), window_minutes (int)."),
    ("read_file", "Read a file of the repository. Arguments: path (string)."),
    ("run_sql", "Run a read-only SQL query on the analytics warehouse. Arguments: sql (string)."),
)
TASKS = (
    "The checkout service has had elevated error rates since this morning. Find the cause and propose a fix.",
    "Summarize last week's latency regressions across the API gateways and name the worst endpoint.",
    "Find which batch job wrote the malformed rows into the orders table yesterday.",
    "Check whether the cache hit rate dropped after the last deploy and explain why.",
)
TOKEN_ID_LOW = 256  # token sessions draw ids from [TOKEN_ID_LOW, vocab_limit): clear of special tokens at the start
TOKENS_PER_RECORD = 43  # a record below is ~43 tokens with SmolLM2's tokenizer (digits are single tokens)


def system_prompt() -> str:
    tools = "\n".join(f"- {name}: {doc}" for name, doc in TOOLS)
    return (
        "You are an operations agent. Work step by step. To use a tool, answer with one line "
        '`CALL <tool> <json arguments>`; its result comes back in the next message. Tools:\n' + tools + "\n"
        "When you know the answer, reply with a short summary for the on-call engineer."
    )


def tool_result(rng: random.Random, num_tokens: int) -> str:
    """About `num_tokens` tokens of JSON log records."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    services = ("checkout", "payments", "search", "gateway", "orders")
    levels = ("INFO", "WARN", "ERROR")
    records = [
        {
            "ts": f"2026-11-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
            "svc": rng.choice(services),
            "lvl": rng.choice(levels),
            "ms": rng.randint(1, 5000),
            "code": rng.choice((200, 200, 200, 404, 500, 503)),
        }
        for _ in range(max(1, round(num_tokens / TOKENS_PER_RECORD)))
    ]
    return json.dumps(records, separators=(",", ":"))


def check_session_shape(turns: int, tool_result_tokens: int) -> None:
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if tool_result_tokens < 1:
        raise ValueError(f"tool_result_tokens must be >= 1, got {tool_result_tokens}")


@dataclass
class AgentSession:
    """One agent's conversation; `messages()` is the request of the next turn."""

    session_id: str
    turns: int
    tool_result_tokens: int
    seed: int
    history: list[dict[str, str]] = field(default_factory=list)
    turns_done: int = 0

    def __post_init__(self) -> None:
        check_session_shape(self.turns, self.tool_result_tokens)
        self._rng = random.Random(self.seed)
        task = TASKS[self.seed % len(TASKS)]
        self.history = [{"role": "system", "content": system_prompt()}, {"role": "user", "content": task}]

    @property
    def finished(self) -> bool:
        return self.turns_done >= self.turns

    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.history]

    def add_reply(self, reply: str) -> None:
        """The model's answer to the current turn; appends the next tool result unless the session is done."""
        if self.finished:
            raise ValueError("add_reply: the session has already had all its turns")
        self.history.append({"role": "assistant", "content": reply or "(no answer)"})
        self.turns_done += 1
        if not self.finished:
            tool = TOOLS[self._rng.randrange(len(TOOLS))][0]
            result = tool_result(self._rng, self.tool_result_tokens)
            self.history.append({"role": "user", "content": f"Tool `{tool}` returned:\n{result}"})


@dataclass
class TokenAgentSession:
    """An agent session in token ids, for models without a tokenizer (`synthetic:`), over /v1/completions.

    Turn 1 sends `tool_result_tokens` ids (system prompt and first tool result); every later turn
    resends the history plus the reply's ids (as the server returned them, with return_token_ids)
    and `tool_result_tokens` new ids. Ids are drawn from [TOKEN_ID_LOW, vocab_limit), seeded per session.
    """

    session_id: str
    turns: int
    tool_result_tokens: int
    seed: int
    vocab_limit: int
    history: list[int] = field(default_factory=list)
    turns_done: int = 0

    def __post_init__(self) -> None:
        check_session_shape(self.turns, self.tool_result_tokens)
        if self.vocab_limit <= TOKEN_ID_LOW:
            raise ValueError(f"vocab_limit must be > {TOKEN_ID_LOW}, got {self.vocab_limit}")
        self._rng = random.Random(self.seed)
        self.history = self._random_ids()

    @property
    def finished(self) -> bool:
        return self.turns_done >= self.turns

    def prompt(self) -> list[int]:
        return list(self.history)

    def add_reply(self, reply_ids: list[int]) -> None:
        """The model's answer (token ids) to the current turn; appends the next tool result unless done."""
        if self.finished:
            raise ValueError("add_reply: the session has already had all its turns")
        self.history.extend(reply_ids)
        self.turns_done += 1
        if not self.finished:
            self.history.extend(self._random_ids())

    def _random_ids(self) -> list[int]:
        return [self._rng.randrange(TOKEN_ID_LOW, self.vocab_limit) for _ in range(self.tool_result_tokens)]

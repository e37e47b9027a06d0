"""Prefill, greedy decoding and teacher forcing on forkable KV sequences: the evaluation's model calls.

Every configuration is a (prefill precision, decode precision) pair run the way the serving path runs
it: the prefill precision computes the KV of prompt[:-1] (in chunks of the engine's token budget), and
the decode precision computes the last prompt token and every token after it, so the first output
token already comes from the decode precision.

Greedy decoding by verification. A configuration's greedy output is found from one teacher-forced
pass over the reference continuation R: while the configuration's argmax equals R[j], its greedy
output is R[j] (same inputs, same next-token distribution); at the first disagreement j its token is
its own argmax, and from there it decodes step by step. This gives the configuration's greedy output
with one forward over R plus one step per token after the divergence, instead of one step per token;
the teacher-forced logits are the same ones the KL metrics use. Logits of a multi-token forward and of
a one-token step differ only in fp32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixquant_serve.eval.kv import ForkableKVCache, KVSequence
from mixquant_serve.model.tokenizer import Tokenizer
from mixquant_serve.quant.precision import Precision


@dataclass(frozen=True)
class StopRule:
    """When greedy decoding of an answer ends: an end-of-sequence token, a newline, or max_new_tokens."""

    eos_token_ids: frozenset[int]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def is_done(self, tokenizer: Tokenizer, token_ids: list[int]) -> bool:
        if not token_ids:
            return False
        if token_ids[-1] in self.eos_token_ids or len(token_ids) >= self.max_new_tokens:
            return True
        return "\n" in tokenizer.decode(token_ids)


@dataclass
class VerifiedGeneration:
    token_ids: list[int]  # the configuration's greedy output
    matched_prefix: int  # leading tokens equal to the reference continuation
    teacher_forced_logits: torch.Tensor  # [len(reference), vocab] fp32: next-token logits along the reference


def prefill(kv: ForkableKVCache, seq: KVSequence, token_ids: list[int], precision: Precision, chunk_tokens: int) -> None:
    """Appends the KV of token_ids to seq, chunk_tokens at a time (the engine's per-step token budget)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    for start in range(0, len(token_ids), chunk_tokens):
        kv.forward(seq, token_ids[start : start + chunk_tokens], precision)


def greedy_decode(
    kv: ForkableKVCache,
    seq: KVSequence,
    next_input: int,
    precision: Precision,
    tokenizer: Tokenizer,
    stop: StopRule,
    generated: list[int] | None = None,
) -> list[int]:
    """Step-by-step greedy decoding: feeds next_input, appends argmax tokens until stop; returns all generated.

    `generated` holds tokens already decided (next_input is its last one, or the last prompt token if empty).
    """
    tokens = list(generated or [])
    while not stop.is_done(tokenizer, tokens):
        hidden = kv.forward(seq, [next_input], precision)  # [1, hidden]
        next_input = int(kv.logits(hidden)[0].argmax())
        tokens.append(next_input)
    return tokens


def teacher_forced_logits(
    kv: ForkableKVCache, seq: KVSequence, last_prompt_token: int, continuation: list[int], precision: Precision
) -> torch.Tensor:
    """Logits [len(continuation), vocab] fp32 predicting continuation[j] from prompt + continuation[:j]."""
    if not continuation:
        raise ValueError("continuation must be non-empty")
    hidden = kv.forward(seq, [last_prompt_token, *continuation[:-1]], precision)  # [len(continuation), hidden]
    return kv.logits(hidden)


def generate_by_verification(
    kv: ForkableKVCache,
    seq: KVSequence,
    last_prompt_token: int,
    reference: list[int],
    precision: Precision,
    tokenizer: Tokenizer,
    stop: StopRule,
) -> VerifiedGeneration:
    """Greedy output of `precision` on seq (the prompt minus its last token), verified against `reference`.

    reference must be a complete greedy answer under `stop` (it ends where stop says it ends).
    """
    prompt_tokens = seq.num_tokens + 1
    logits = teacher_forced_logits(kv, seq, last_prompt_token, reference, precision)
    own_choice = logits.argmax(dim=-1).tolist()
    matched = 0
    while matched < len(reference) and own_choice[matched] == reference[matched]:
        matched += 1
    if matched == len(reference):
        return VerifiedGeneration(list(reference), matched, logits)
    tokens = reference[:matched] + [own_choice[matched]]
    # the KV of prompt + reference[:matched] is this configuration's own; later slots are forgotten
    kv.truncate(seq, prompt_tokens + matched)
    tokens = greedy_decode(kv, seq, tokens[-1], precision, tokenizer, stop, generated=tokens)
    return VerifiedGeneration(tokens, matched, logits)

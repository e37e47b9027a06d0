"""Prefill, greedy decoding and teacher forcing on forkable KV sequences: the evaluation's model calls.

Every configuration is a (prefill precision, decode precision) pair run the way the serving path runs
it: the prefill precision computes the KV of prompt[:-1] (in chunks of the engine's token budget), and
the decode precision computes the last prompt token and every token after it, so the first output
token already comes from the decode precision.

On a CPU a decoding forward costs about as much for 30 tokens as for one (it is bound by reading the
weights), so answers are decoded with two exact shortcuts that feed several tokens per forward:

* verification: one teacher-forced pass over the reference answer R gives the configuration's argmax
  at every position of R; while it equals R[j] the configuration's greedy token is R[j] (same inputs),
  at the first disagreement it is its own argmax, and decoding continues from there. The same pass
  gives the teacher-forced logits of the KL metrics.
* prompt-lookup drafts: each decoding forward also feeds up to `draft_tokens` tokens guessed from the
  text so far (what followed the latest earlier occurrence of its last n-gram, as n-gram speculative
  decoding does); the argmax keeps a drafted token only while it equals it. A draft saves forwards and
  never chooses a token.

Numerics. A multi-token forward sums in another fp32 order than a one-token step. In bf16 (fp32 on
CPU) that moves logits by ~1e-5. With quantized activations (all-nvfp4, all-fp8 decode) an fp32-level
difference can flip the rounding of an activation to the 4- or 8-bit grid, so the logits of one
multi-token forward and of one-token steps differ by as much as quantization noise itself (measured on
the bundled model, same tokens: up to 3.8 in a logit with fp8, KL 0.03). Quantized decode here is
therefore a different draw of the same quantization noise than the engine's one-token steps (what a
serving engine with speculative decoding or a larger decode batch also gets), not a bitwise replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixquant_serve.eval.kv import ForkableKVCache, KVSequence
from mixquant_serve.model.tokenizer import Tokenizer
from mixquant_serve.quant.precision import Precision

DRAFT_TOKENS = 8  # drafted tokens verified per decoding forward
DRAFT_MAX_NGRAM = 3  # longest suffix n-gram looked up in the text so far


@dataclass(frozen=True)
class StopRule:
    """When greedy decoding of an answer ends: an end-of-sequence token, a stop string in the text, or max_new_tokens."""

    eos_token_ids: frozenset[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")

    def is_done(self, tokenizer: Tokenizer, token_ids: list[int]) -> bool:
        if not token_ids:
            return False
        if token_ids[-1] in self.eos_token_ids or len(token_ids) >= self.max_new_tokens:
            return True
        text = tokenizer.decode(token_ids)
        return any(s in text for s in self.stop_strings)


@dataclass
class ConfigGeneration:
    token_ids: list[int]  # the configuration's greedy answer
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
    prompt: list[int],
    precision: Precision,
    tokenizer: Tokenizer,
    stop: StopRule,
    generated: list[int] | None = None,
    draft_tokens: int = DRAFT_TOKENS,
    draft_context: list[int] | None = None,
) -> list[int]:
    """Greedy decoding after prompt; returns all generated tokens (`generated` plus the new ones).

    seq holds the KV of prompt[:-1] + generated[:-1]: the next input is generated[-1], or the last prompt
    token when nothing was generated yet. Each forward verifies up to draft_tokens drafted tokens
    (0: one token per forward), looked up in prompt, draft_context (e.g. another answer) and the tokens so far.
    """
    tokens = list(generated or [])
    next_input = tokens[-1] if tokens else prompt[-1]
    lookup_prefix = [*prompt, *(draft_context or [])]
    while not stop.is_done(tokenizer, tokens):
        budget = stop.max_new_tokens - len(tokens) - 1  # a draft never runs past the token cap
        draft = prompt_lookup_draft([*lookup_prefix, *tokens], min(draft_tokens, budget))
        start = seq.num_tokens
        hidden = kv.forward(seq, [next_input, *draft], precision)  # [1 + len(draft), hidden]
        choices = kv.logits(hidden).argmax(dim=-1).tolist()
        for position, choice in enumerate(choices):
            tokens.append(choice)
            if stop.is_done(tokenizer, tokens) or position == len(draft) or choice != draft[position]:
                break
        # KV is valid for the inputs whose successors were accepted: next_input and the drafts before the last choice
        kv.truncate(seq, start + position + 1)
        next_input = tokens[-1]
    return tokens


def prompt_lookup_draft(history: list[int], max_tokens: int, max_ngram: int = DRAFT_MAX_NGRAM) -> list[int]:
    """Up to max_tokens tokens that followed the latest earlier occurrence of history's last n-gram (longest n first)."""
    if max_tokens <= 0:
        return []
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        pattern = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == pattern:
                return history[start + n : start + n + max_tokens]
    return []


def teacher_forced_logits(
    kv: ForkableKVCache, seq: KVSequence, last_prompt_token: int, continuation: list[int], precision: Precision
) -> torch.Tensor:
    """Logits [len(continuation), vocab] fp32 predicting continuation[j] from prompt + continuation[:j]."""
    if not continuation:
        raise ValueError("continuation must be non-empty")
    hidden = kv.forward(seq, [last_prompt_token, *continuation[:-1]], precision)  # [len(continuation), hidden]
    return kv.logits(hidden)


def decode_against_reference(
    kv: ForkableKVCache,
    seq: KVSequence,
    prompt: list[int],
    reference: list[int],
    precision: Precision,
    tokenizer: Tokenizer,
    stop: StopRule,
) -> ConfigGeneration:
    """The configuration's greedy answer on seq (the KV of prompt[:-1]) and its logits along `reference`.

    reference must be a complete greedy answer under `stop` (it ends where stop says it ends).
    """
    if seq.num_tokens != len(prompt) - 1:
        raise ValueError(f"seq must hold prompt[:-1] ({len(prompt) - 1} tokens), holds {seq.num_tokens}")
    logits = teacher_forced_logits(kv, seq, prompt[-1], reference, precision)
    own_choice = logits.argmax(dim=-1).tolist()
    matched = matched_prefix(own_choice, reference)
    if matched == len(reference):
        return ConfigGeneration(list(reference), logits)
    tokens = reference[:matched] + [own_choice[matched]]
    # the KV of prompt + reference[:matched] is this configuration's own; later slots are forgotten
    kv.truncate(seq, len(prompt) + matched)
    answer = greedy_decode(kv, seq, prompt, precision, tokenizer, stop, generated=tokens, draft_context=reference)
    return ConfigGeneration(answer, logits)


def matched_prefix(tokens: list[int], reference: list[int]) -> int:
    """Number of leading tokens equal in both lists."""
    count = 0
    while count < min(len(tokens), len(reference)) and tokens[count] == reference[count]:
        count += 1
    return count

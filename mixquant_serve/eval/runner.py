"""Runs every configuration on every item of a suite, sharing all the work that configurations share.

    for each group:       context KV, once per prefill precision          (chunks of the engine budget)
      for each item:      + the item's turns up to prompt[:-1], per prefill precision
        reference:        bf16 branch: greedy answer R (drafts verified, decoding.py), then one teacher-
                          forced pass over R -> reference logits
        each config:      branch of its prefill precision's KV: teacher-forced pass over R in its decode
                          precision -> KL against the reference, and its greedy answer by verification
                          (decoding.py); every branch starts from its own prefill KV

The reference is always computed; the "bf16" configuration, when asked for, is recomputed on its own
branch like any other configuration, so its agreement 1.0 and KL 0 check that branches do not leak into
one another and that the computation is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.eval.configs import REFERENCE, EvalConfig
from mixquant_serve.eval.decoding import (
    StopRule,
    decode_against_reference,
    greedy_decode,
    matched_prefix,
    prefill,
    teacher_forced_logits,
)
from mixquant_serve.eval.kv import ForkableKVCache, KVSequence
from mixquant_serve.eval.metrics import ConfigOutcome, ItemOutcome, kl_divergence
from mixquant_serve.eval.scoring import is_correct, stop_strings
from mixquant_serve.eval.suite import EvalGroup, EvalItem, context_token_ids, prompt_token_ids
from mixquant_serve.model.loader import LoadedModel
from mixquant_serve.quant.precision import Precision

DEFAULT_MAX_NEW_TOKENS = 32
_ENGINE_DEFAULTS = EngineConfig()


@dataclass(frozen=True)
class RunSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    prefill_chunk_tokens: int = _ENGINE_DEFAULTS.max_num_batched_tokens  # as the engine prefills a long prompt
    block_size: int = _ENGINE_DEFAULTS.block_size


@dataclass
class RunTimings:
    """Wall seconds spent per phase (for cost estimates; not part of the reproducible numbers)."""

    prefill_seconds: dict[str, float] = field(default_factory=dict)  # per prefill precision, context + turns
    reference_seconds: float = 0.0
    config_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, table: dict[str, float], key: str, started: float) -> None:
        table[key] = table.get(key, 0.0) + time.perf_counter() - started


@dataclass
class _TokenizedGroup:
    group: EvalGroup
    shared_tokens: list[int]  # prefix of every item prompt of the group, computed once per precision
    prompts: list[tuple[EvalItem, list[int]]]


def evaluate(
    loaded: LoadedModel,
    groups: list[EvalGroup],
    configs: list[EvalConfig],
    settings: RunSettings = RunSettings(),
    progress: bool = True,
    timings: RunTimings | None = None,
) -> list[ItemOutcome]:
    """One ItemOutcome per item, in suite order, with one ConfigOutcome per configuration."""
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ValueError("loaded must have a tokenizer (synthetic models have none)")
    if not configs:
        raise ValueError("configs must name at least one configuration")
    timings = timings if timings is not None else RunTimings()
    tokenized = [_tokenize(loaded, group, settings.max_new_tokens) for group in groups]
    precisions: list[Precision] = list(dict.fromkeys([REFERENCE.prefill_precision, *(c.prefill_precision for c in configs)]))
    longest_prompt = max(len(ids) for group in tokenized for _, ids in group.prompts)
    blocks_per_prompt = -(-longest_prompt // settings.block_size) + 2  # + the copied partial block of two branches
    blocks_per_answer = -(-(settings.max_new_tokens + 1) // settings.block_size) + 1
    kv = ForkableKVCache(
        loaded.model,
        len(precisions) * blocks_per_prompt + blocks_per_answer,
        settings.block_size,
        next(loaded.model.parameters()).device,
    )
    outcomes: list[ItemOutcome] = []
    bar = tqdm(total=sum(len(group.prompts) for group in tokenized), unit="item", disable=not progress)
    try:
        for group in tokenized:
            bar.set_description(f"{group.group.group_id} context {len(group.shared_tokens)} tok")
            shared = {}
            for precision in precisions:
                started = time.perf_counter()
                shared[precision] = kv.new_sequence()
                prefill(kv, shared[precision], group.shared_tokens, precision, settings.prefill_chunk_tokens)
                timings.add(timings.prefill_seconds, precision, started)
            for item, prompt in group.prompts:
                bar.set_description(f"{item.item_id} {item.family}")
                stop = StopRule(frozenset(tokenizer.eos_token_ids), settings.max_new_tokens, stop_strings(item))
                outcomes.append(_evaluate_item(kv, loaded, group.group, item, prompt, shared, configs, settings, stop, timings))
                bar.update(1)
            for seq in shared.values():
                kv.free(seq)
    finally:
        bar.close()
    return outcomes


def _tokenize(loaded: LoadedModel, group: EvalGroup, max_new_tokens: int) -> _TokenizedGroup:
    tokenizer = loaded.tokenizer
    context = context_token_ids(tokenizer, group)
    prompts = [(item, prompt_token_ids(tokenizer, group, item)) for item in group.items]
    limit = loaded.config.max_position_embeddings
    shared = len(context)
    for item, prompt in prompts:
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(
                f"item {item.item_id}: {len(prompt)} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                f"model's {limit} positions"
            )
        common = 0
        while common < min(len(context), len(prompt)) and context[common] == prompt[common]:
            common += 1
        shared = min(shared, common, len(prompt) - 1)  # the last prompt token always runs in the decode precision
    return _TokenizedGroup(group, context[:shared], prompts)


def _evaluate_item(
    kv: ForkableKVCache,
    loaded: LoadedModel,
    group: EvalGroup,
    item: EvalItem,
    prompt: list[int],
    shared: dict[str, KVSequence],
    configs: list[EvalConfig],
    settings: RunSettings,
    stop: StopRule,
    timings: RunTimings,
) -> ItemOutcome:
    tokenizer = loaded.tokenizer
    last_token = prompt[-1]
    prompts: dict[str, KVSequence] = {}
    for precision, context_seq in shared.items():  # prompt[:-1] per prefill precision, on the shared context
        started = time.perf_counter()
        prompts[precision] = kv.branch(context_seq)
        turns = prompt[context_seq.num_tokens : -1]
        prefill(kv, prompts[precision], turns, precision, settings.prefill_chunk_tokens)
        timings.add(timings.prefill_seconds, precision, started)

    started = time.perf_counter()
    branch = kv.branch(prompts[REFERENCE.prefill_precision])
    reference = greedy_decode(kv, branch, prompt, REFERENCE.decode_precision, tokenizer, stop)
    kv.free(branch)
    branch = kv.branch(prompts[REFERENCE.prefill_precision])
    reference_logits = teacher_forced_logits(kv, branch, last_token, reference, REFERENCE.decode_precision)
    kv.free(branch)
    _check_finite(reference_logits, item, "reference")
    timings.reference_seconds += time.perf_counter() - started
    reference_text = tokenizer.decode(reference)
    outcome = ItemOutcome(
        item.item_id, group.group_id, item.family, item.skill, len(prompt), reference, reference_text,
        is_correct(item, reference_text),
    )

    for config in configs:
        started = time.perf_counter()
        branch = kv.branch(prompts[config.prefill_precision])
        generation = decode_against_reference(kv, branch, prompt, reference, config.decode_precision, tokenizer, stop)
        kv.free(branch)
        _check_finite(generation.teacher_forced_logits, item, config.name)
        with torch.inference_mode():
            kl = kl_divergence(reference_logits, generation.teacher_forced_logits).tolist()
        text = tokenizer.decode(generation.token_ids)
        outcome.configs[config.name] = ConfigOutcome(
            token_ids=generation.token_ids,
            text=text,
            correct=is_correct(item, text),
            agrees=generation.token_ids == reference,
            matched_prefix=matched_prefix(generation.token_ids, reference),
            kl=kl,
        )
        timings.add(timings.config_seconds, config.name, started)
    for seq in prompts.values():
        kv.free(seq)
    return outcome


def _check_finite(logits: torch.Tensor, item: EvalItem, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"item {item.item_id}: {what} logits are not finite (a KV slot was read before written?)")

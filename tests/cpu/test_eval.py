"""Quality evaluation: scoring rules, the suite generator, forkable KV, decoding shortcuts, and a smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixquant_serve.eval.cli import main as eval_main
from mixquant_serve.eval.configs import CONFIG_NAMES, CONFIGS, configs_by_name
from mixquant_serve.eval.decoding import (
    StopRule,
    decode_against_reference,
    greedy_decode,
    matched_prefix,
    prefill,
    prompt_lookup_draft,
)
from mixquant_serve.eval.kv import ForkableKVCache
from mixquant_serve.eval.metrics import kl_divergence, loss_fractions
from mixquant_serve.eval.quality import run_quality_eval
from mixquant_serve.eval.scoring import is_correct, normalize_value, parse_tool_call, stop_strings
from mixquant_serve.eval.suite import (
    FAMILIES,
    EvalItem,
    context_token_ids,
    prompt_token_ids,
    read_suite,
    select_items,
    suite_sha256,
    suite_to_jsonl,
)
from mixquant_serve.eval.suite_gen import DEFAULT_SEED, DEFAULT_SPEC, SuiteSpec, generate_suite
from mixquant_serve.model.loader import load_model

CPU = torch.device("cpu")
COMMITTED_SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "suite.jsonl"
SMALL_SPEC = SuiteSpec(tool_result_tokens=(64, 96), items_per_family=1)
TOOL_PREFIX = '<tool_call>\n{"name": "'


def _value_item(answer: str, prefix: str = '"key": "') -> EvalItem:
    return EvalItem("t-0", "lookup", "lookup-key", [{"role": "user", "content": "?"}], prefix, "value", answer)


def _call_item(answer: dict) -> EvalItem:
    return EvalItem("t-1", "tool_call", "call-delete", [{"role": "user", "content": "?"}], TOOL_PREFIX, "tool_call",
                    json.dumps(answer))


# ---- scoring -------------------------------------------------------------------------------------------


def test_value_scoring_is_exact_after_normalization():
    item = _value_item("Lyon hub 42")
    assert is_correct(item, 'Lyon hub 42"')
    assert is_correct(item, 'lyon  hub 42."')  # case, inner whitespace, one trailing period
    assert is_correct(item, 'Lyon hub 42", "next": "x"\n')  # the value ends at the closing quote
    assert is_correct(item, "Lyon hub 42")  # no closing quote: the whole completion
    assert not is_correct(item, 'Lyon hub 4"')
    assert not is_correct(item, 'Lyon hub 42 (main)"')
    assert not is_correct(item, '\nLyon hub 42"')  # the first line is empty
    assert normalize_value("  A-214. ") == "a-214"


def test_tool_call_scoring_parses_json_and_compares_exactly():
    item = _call_item({"name": "update_host", "arguments": {"host": "api-west-3", "ip": "10.1.2.3"}})
    assert is_correct(item, 'update_host", "arguments": {"host": "api-west-3", "ip": "10.1.2.3"}}\n</tool_call>')
    assert is_correct(item, 'update_host", "arguments": {"ip": "10.1.2.3", "host": "api-west-3"}}')  # key order
    assert is_correct(item, 'update_host", "arguments": "{\\"host\\": \\"api-west-3\\", \\"ip\\": \\"10.1.2.3\\"}"}')
    assert not is_correct(item, 'update_host", "arguments": {"host": "api-west-3"}}')  # missing argument
    assert not is_correct(item, 'update_host", "arguments": {"host": "api-west-3", "ip": "10.1.2.3", "x": "1"}}')
    assert not is_correct(item, 'get_host", "arguments": {"host": "api-west-3", "ip": "10.1.2.3"}}')
    assert not is_correct(item, 'update_host", "arguments": {"host": "api-west-3", "ip": "10.1.2.3"}')  # unclosed
    assert parse_tool_call('<tool_call>\n{"name": "f", "arguments": {"n": 1}}') == {"name": "f", "arguments": {"n": 1}}
    typed = _call_item({"name": "f", "arguments": {"n": 1}})
    assert not is_correct(typed, 'f", "arguments": {"n": "1"}}') and not is_correct(typed, 'f", "arguments": {"n": 1.0}}')


def test_stop_strings_follow_the_answer_kind():
    assert stop_strings(_value_item("x")) == ("\n", '"')
    assert stop_strings(_call_item({"name": "f", "arguments": {}})) == ("\n",)


# ---- suite ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_suite(bundled):
    return generate_suite(bundled.tokenizer, DEFAULT_SEED)


def test_default_suite_sizes_and_lengths(bundled, default_suite):
    tokenizer = bundled.tokenizer
    items = [(group, item) for group in default_suite for item in group.items]
    assert len(items) == DEFAULT_SPEC.num_items >= 150
    counts = {family: sum(item.family == family for _, item in items) for family in FAMILIES}
    assert counts == {family: DEFAULT_SPEC.num_items // 3 for family in FAMILIES}
    assert len({item.item_id for _, item in items}) == len(items)
    for group in default_suite:
        assert 1000 <= group.tool_result_tokens <= 6000
        context = context_token_ids(tokenizer, group)
        for item in group.items:
            prompt = prompt_token_ids(tokenizer, group, item)
            assert prompt[: len(context)] == context, "items of a group must share its context's tokens"
            assert len(prompt) + 32 <= bundled.config.max_position_embeddings


def test_default_suite_answers_are_in_the_transcript(default_suite):
    for group in default_suite:
        (tool_result,) = [json.loads(m["content"]) for m in group.context if m["role"] == "tool" and len(m["content"]) > 100]
        (entries,) = tool_result.values()
        for item in group.items:
            turns_text = json.dumps(item.turns)
            if item.family == "lookup":
                key = item.response_prefix.split('"')[1]
                assert entries[key] == item.answer
            elif item.answer_kind == "value":  # multi-turn: a ticket given earlier, or a value from the result
                assert item.answer in turns_text or item.answer in entries.values()
            else:
                call = json.loads(item.answer)
                for value in call["arguments"].values():
                    assert value in turns_text or value in entries or value in entries.values()
                assert call["name"] in {tool["function"]["name"] for tool in group.tools}


def test_suite_generation_is_deterministic_and_matches_the_committed_file(bundled, default_suite):
    assert suite_sha256(generate_suite(bundled.tokenizer, DEFAULT_SEED)) == suite_sha256(default_suite)
    assert suite_sha256(generate_suite(bundled.tokenizer, DEFAULT_SEED + 1)) != suite_sha256(default_suite)
    assert COMMITTED_SUITE.read_text(encoding="utf-8") == suite_to_jsonl(default_suite)
    assert suite_to_jsonl(read_suite(COMMITTED_SUITE)) == suite_to_jsonl(default_suite)


def test_select_items_keeps_suite_order():
    groups = [_group("a", 3), _group("b", 3)]
    assert [item.item_id for g in select_items(groups, 4) for item in g.items] == ["a-0", "a-1", "a-2", "b-0"]
    with pytest.raises(ValueError, match="limit"):
        select_items(groups, 0)


def _group(name: str, n: int):
    from mixquant_serve.eval.suite import EvalGroup

    items = [EvalItem(f"{name}-{i}", "lookup", "lookup-key", [], "", "value", "x") for i in range(n)]
    return EvalGroup(name, "settings", [], [], 1000, items)


# ---- configurations and metrics ------------------------------------------------------------------------


def test_configs_are_the_five_of_the_issue():
    assert CONFIG_NAMES == ("bf16", "mixquant-nvfp4", "all-nvfp4", "mixquant-fp8", "all-fp8")
    assert [(c.prefill_precision, c.decode_precision) for c in CONFIGS] == [
        ("bf16", "bf16"), ("nvfp4", "bf16"), ("nvfp4", "nvfp4"), ("fp8", "bf16"), ("fp8", "fp8")]
    with pytest.raises(ValueError, match="unknown"):
        configs_by_name(["bf16", "int4"])


def test_kl_divergence_is_zero_on_itself_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    assert torch.equal(kl_divergence(p, p), torch.zeros(4))
    expected = (torch.softmax(p, -1) * (torch.log_softmax(p, -1) - torch.log_softmax(q, -1))).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected)


def test_loss_fraction_is_mixquant_loss_over_full_quantization_loss():
    def metrics(accuracy, kl, agreement):
        return {"reference_accuracy": 0.5, "accuracy": accuracy, "kl_mean": kl, "first_token_kl_mean": kl,
                "agreement": agreement}

    summary = {"mixquant-nvfp4": {"all": metrics(0.45, 0.1, 0.8)}, "all-nvfp4": {"all": metrics(0.3, 0.4, 0.6)}}
    fractions = loss_fractions(summary)["mixquant-nvfp4 / all-nvfp4"]["all"]
    assert fractions["accuracy_loss_fraction"] == pytest.approx(0.25)
    assert fractions["kl_mean_fraction"] == pytest.approx(0.25)
    assert fractions["disagreement_fraction"] == pytest.approx(0.5)
    summary["all-nvfp4"]["all"]["accuracy"] = 0.5  # no loss to take a share of
    assert loss_fractions(summary)["mixquant-nvfp4 / all-nvfp4"]["all"]["accuracy_loss_fraction"] is None


# ---- forkable KV and decoding --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic:tiny-llama", CPU, torch.float32, {"bf16", "nvfp4", "fp8"}, progress=False)


def test_branches_share_the_prefix_and_never_see_each_others_writes(tiny):
    kv = ForkableKVCache(tiny.model, num_blocks=32, block_size=4, device=CPU)
    g = torch.Generator().manual_seed(1)
    prefix, left, right = (torch.randint(0, 500, (n,), generator=g).tolist() for n in (10, 6, 7))
    parent = kv.new_sequence()
    kv.forward(parent, prefix, "bf16")
    a, b = kv.branch(parent), kv.branch(parent)
    assert a.block_table[:2] == parent.block_table[:2] and a.block_table[2] != parent.block_table[2]
    out_a = kv.forward(a, left, "bf16")
    out_b = kv.forward(b, right, "bf16")
    again_a = kv.forward(kv.branch(parent), left, "bf16")
    fresh = kv.new_sequence()
    kv.forward(fresh, prefix, "bf16")
    expected_b = kv.forward(fresh, right, "bf16")
    assert torch.equal(out_a, again_a)  # b's writes did not reach a's copy of the shared partial block
    torch.testing.assert_close(out_b, expected_b, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="frozen"):
        kv.forward(parent, [1], "bf16")
    with pytest.raises(RuntimeError, match="live branches"):
        kv.free(parent)
    with pytest.raises(ValueError, match="branch point"):
        kv.truncate(a, 9)


def test_unwritten_slots_are_nan_so_a_leak_cannot_pass_silently(tiny):
    kv = ForkableKVCache(tiny.model, num_blocks=8, block_size=4, device=CPU)
    seq = kv.new_sequence()
    kv.forward(seq, [1, 2, 3], "bf16")
    assert torch.isnan(kv.cache[seq.block_table[0], :, :, 3]).all()  # slot 3 of the block was never written
    seq.num_tokens = 4  # pretend slot 3 was written: the next forward reads it
    assert torch.isnan(kv.forward(seq, [5], "bf16")).any()


def test_prompt_lookup_draft_continues_the_latest_match():
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert prompt_lookup_draft(history, 3) == [7, 8, 5]
    assert prompt_lookup_draft([4, 5, 6], 3) == []
    assert prompt_lookup_draft(history, 0) == []


def test_decoding_shortcuts_give_the_step_by_step_greedy_answer(bundled):
    tokenizer = bundled.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat exactly: alpha beta gamma delta"}])
    stop = StopRule(frozenset(tokenizer.eos_token_ids), 12)
    kv = ForkableKVCache(bundled.model, num_blocks=64, block_size=16, device=CPU)
    answers = {}
    for precision in ("bf16", "nvfp4"):
        base = kv.new_sequence()
        prefill(kv, base, prompt[:-1], precision, chunk_tokens=2048)
        for draft in (0, 8):
            branch = kv.branch(base)
            answers[precision, draft] = greedy_decode(kv, branch, prompt, "bf16", tokenizer, stop, draft_tokens=draft)
            kv.free(branch)
        for decode in ("bf16", "nvfp4"):
            branch = kv.branch(base)
            reference = answers["bf16", 0]
            generation = decode_against_reference(kv, branch, prompt, reference, decode, tokenizer, stop)
            answers[precision, decode] = generation.token_ids
            assert generation.teacher_forced_logits.shape == (len(reference), bundled.model.config.vocab_size)
            kv.free(branch)
            # verification: the answer follows the reference while its own argmax does, then its own token
            matched = matched_prefix(generation.token_ids, reference)
            own_choice = generation.teacher_forced_logits.argmax(dim=-1).tolist()
            assert own_choice[:matched] == reference[:matched]
            if matched < len(reference):
                assert generation.token_ids[matched] == own_choice[matched]
        kv.free(base)
    assert answers["bf16", 8] == answers["bf16", 0] == answers["bf16", "bf16"]
    assert answers["nvfp4", 8] == answers["nvfp4", 0] == answers["nvfp4", "bf16"]


# ---- smoke run -----------------------------------------------------------------------------------------


def test_smoke_run_reference_agrees_with_itself_every_config_scores_and_reruns_are_identical(bundled):
    suite = generate_suite(bundled.tokenizer, DEFAULT_SEED, SMALL_SPEC)
    configs = list(CONFIGS)
    runs = [
        run_quality_eval(bundled, suite, configs, suite_source="small", seed=DEFAULT_SEED, limit=2, progress=False)
        for _ in range(2)
    ]
    first, second = (run.document for run in runs)
    summary = first["summary"]
    assert set(summary) == set(CONFIG_NAMES)
    reference = summary["bf16"]["all"]
    assert reference["agreement"] == 1.0 and reference["mean_matched_prefix"] == reference["mean_reference_tokens"]
    assert reference["kl_mean"] == 0.0 and reference["first_token_kl_mean"] == 0.0
    assert reference["accuracy"] == reference["reference_accuracy"]
    for name in CONFIG_NAMES:
        for key in ("accuracy", "agreement", "kl_mean", "kl_p95", "first_token_kl_mean", "first_token_kl_p95"):
            assert summary[name]["all"][key] >= 0.0
        assert summary[name]["all"]["items"] == 2
    assert summary["all-nvfp4"]["all"]["kl_mean"] > 0.0  # a quantized configuration does move the distributions
    assert set(first["loss_fractions"]) == {"mixquant-nvfp4 / all-nvfp4", "mixquant-fp8 / all-fp8"}
    assert '"bf16"' in runs[0].tables and "fp32" in runs[0].tables
    first.pop("run"), second.pop("run")
    assert first == second


def test_cli_rejects_bad_arguments_before_loading_a_model(capsys):
    assert eval_main(["eval", "quality", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["eval", "quality", "--configs", "int4"])
    with pytest.raises(SystemExit):
        eval_main(["eval", "quality", "--seed", "1", "--suite", "x.jsonl"])

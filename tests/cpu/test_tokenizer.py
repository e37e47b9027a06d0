"""Tokenizer on the bundled SmolLM2 tokenizer: chat template, tools (inlined and native), streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest

from mixquant_serve.model.checkpoint import open_checkpoint
from mixquant_serve.model.tokenizer import IncrementalDecoder, Tokenizer

BUNDLED = "bundled:smollm2-135m-instruct"
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END = 1, 2

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"temp_c": 9}'},
]

# A template in the style of Qwen's: renders tools, tool_calls and the tool role itself.
NATIVE_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir) -> Tokenizer:
    tokenizer_dir = open_checkpoint(BUNDLED, cache_dir=model_cache_dir, progress=False).tokenizer_dir
    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def native_tokenizer(tokenizer, tmp_path_factory) -> Tokenizer:
    """The bundled tokenizer with a tool-aware template and a generation config listing two EOS ids."""
    folder = tmp_path_factory.mktemp("native-tools-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer.tokenizer_dir / name, folder / name)
    (folder / "chat_template.jinja").write_text(NATIVE_TOOLS_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return Tokenizer(folder)


pytestmark = pytest.mark.slow  # every test here uses the bundled tokenizer


def test_encode_decode_round_trip_without_added_special_tokens(tokenizer):
    text = "Hello, world! Ça va? 🙂"
    ids = tokenizer.encode(text)
    assert IM_START not in ids and IM_END not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 49152


def test_eos_ids_include_the_chatml_end_of_turn(tokenizer, native_tokenizer):
    assert tokenizer.eos_token_ids == [IM_END]
    assert native_tokenizer.eos_token_ids == [IM_END, 0]  # tokenizer EOS, then generation_config's extra id


def test_chat_without_tools_is_the_models_own_template(tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer.tokenizer_dir, local_files_only=True)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.render_chat(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert not tokenizer.render_chat(messages, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages)
    assert ids == tokenizer.encode(text)
    assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2  # system, user, assistant header as single ids


def test_default_system_prompt_is_found_from_the_template(tokenizer):
    assert tokenizer.default_system_prompt == SMOLLM_DEFAULT_SYSTEM
    assert not tokenizer.template_handles_tools and not tokenizer.template_handles_tool_role


def test_tools_go_into_a_new_system_message_after_the_default_prompt(tokenizer):
    text = tokenizer.render_chat([{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL])
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith(f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(WEATHER_TOOL)}\n</tools>" in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert rest == "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert text.count("<|im_start|>system") == 1


def test_tools_are_appended_to_the_callers_system_message(tokenizer):
    second_tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.render_chat(messages, tools=[WEATHER_TOOL, second_tool])
    assert text.startswith("<|im_start|>system\nAnswer briefly.\n\n# Tools\n")
    assert SMOLLM_DEFAULT_SYSTEM not in text
    assert f"<tools>\n{json.dumps(WEATHER_TOOL)}\n{json.dumps(second_tool)}\n</tools>" in text


def test_tool_calls_and_tool_results_render_in_hermes_form(tokenizer):
    text = tokenizer.render_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    conversation = text.split("<|im_end|>\n", 2)[2]  # after the system and first user turns
    assert conversation == (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n"
        '<tool_response>\n{"temp_c": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp_c": 9}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    # Text before the calls is kept; the caller's messages are not modified.
    with_text = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "content": "Let me check."}]
    assert "<|im_start|>assistant\nLet me check.\n<tool_call>\n" in tokenizer.render_chat(with_text)
    assert TOOL_CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_a_tool_aware_template_receives_tools_and_calls_unchanged(native_tokenizer):
    assert native_tokenizer.template_handles_tools and native_tokenizer.template_handles_tool_calls
    assert native_tokenizer.template_handles_tool_role
    text = native_tokenizer.render_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;<|im_end|>\n")
    assert 'CALL get_weather {"city": "Paris"}\n' in text  # JSON-string arguments arrive as an object
    assert 'CALL get_weather {"city": "Oslo"}\n' in text
    assert '<|im_start|>tool\n{"temp_c": 21}<|im_end|>\n<|im_start|>tool\n{"temp_c": 9}<|im_end|>\n' in text
    assert "<tool_response>" not in text and "# Tools" not in text


@pytest.mark.parametrize(
    "messages, tools, pattern",
    [
        ([], None, "non-empty list"),
        ([{"role": "robot", "content": "x"}], None, r"messages\[0\]\.role='robot'"),
        ([{"role": "user", "content": None}], None, r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], None, r"messages\[0\]\.content"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
            None,
            r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON",
        ),
        (
            [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
            None,
            "only assistant messages carry tool_calls",
        ),
        ([{"role": "user", "content": "x"}], [{"name": "f"}], r"tools\[0\] must look like"),
        ([{"role": "user", "content": "x"}], {"type": "function"}, "tools must be a list"),
    ],
)
def test_bad_messages_and_tools_are_rejected(tokenizer, messages, tools, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenizer.render_chat(messages, tools=tools)


def test_missing_tokenizer_dir_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_dir=None"):
        Tokenizer(None)
    with pytest.raises(ValueError, match="is not a folder"):
        Tokenizer(tmp_path / "absent")


STREAM_TEXT = "Café crème, naïve façade — 😀👍🏽 日本語 and ñandú! Ünïcödé 🇫🇷 done."


def test_incremental_decoder_concatenation_equals_full_decode(tokenizer):
    ids = tokenizer.encode(STREAM_TEXT)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == STREAM_TEXT
    assert decoder.text == STREAM_TEXT and decoder.flush() == ""
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some emoji bytes span several tokens: those pushes had to wait


def test_incremental_decoder_with_special_tokens(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Grüße 👋"}]) + tokenizer.encode("Hallo 😀") + [IM_END]
    for skip in (True, False):
        decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
        streamed = "".join(decoder.push(token) for token in ids) + decoder.flush()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in streamed and "<|im_end|>" not in tokenizer.decode(ids)


def test_incremental_decoder_holds_an_incomplete_character_until_flush(tokenizer):
    ids = tokenizer.encode("ok 😀")
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids[:-1]]  # the emoji's last byte is missing
    assert "".join(pieces) == "ok" and all("\ufffd" not in piece for piece in pieces)
    tail = decoder.flush()
    assert "\ufffd" in tail and "".join(pieces) + tail == tokenizer.decode(ids[:-1])

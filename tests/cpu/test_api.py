"""OpenAI request schemas (validation messages name the field), sampling conversion, tool-call parsing."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mixquant_serve.api import (
    ChatCompletionRequest,
    CompletionRequest,
    MixquantStats,
    describe_validation_error,
    sampling_params,
    usage_of,
)
from mixquant_serve.protocol import RequestStats
from mixquant_serve.tool_calls import ToolCallStreamFilter, parse_tool_calls

USER = [{"role": "user", "content": "hi"}]
KIND_PART = {"type": "text", "text": "kind"}
OSLO_CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def rejection(model, body) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return describe_validation_error(caught.value)


# ---------------------------------------------------------------------------------------------- requests


def test_openai_client_fields_are_accepted_with_neutral_values():
    request = chat(
        n=1,
        logprobs=False,
        top_logprobs=0,
        presence_penalty=0.0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        user="u-1",
        stream=True,
        stream_options={"include_usage": True},
        parallel_tool_calls=True,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_completion_tokens=5,
        stop=["\n\n", "END"],
    )
    assert request.include_usage and request.uses_tools
    assert request.requested_max_tokens() == (5, "max_completion_tokens")
    assert request.stop_strings == ("\n\n", "END")


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"n": 2}, "n", "n=1"),
        ({"logprobs": True}, "logprobs", "not implemented"),
        ({"top_logprobs": 3}, "top_logprobs", "not implemented"),
        ({"presence_penalty": 0.5}, "presence_penalty", "only 0"),
        ({"frequency_penalty": -1}, "frequency_penalty", "only 0"),
        ({"logit_bias": {"42": 5}}, "logit_bias", "not implemented"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", "json_schema"),
        ({"tool_choice": "required"}, "tool_choice", "constrained decoding"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "function 'f'"),
        ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto' or 'required'"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_completion_tokens": -3}, "max_completion_tokens", "greater than or equal to 1"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "disagrees with max_tokens=4"),
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"stop": [1]}, "stop[0]", "valid string"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
        ({"stream": True, "stream_options": {"include_usage": True, "other": 1}}, "stream_options.other", "Extra"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "pattern"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "'function'"),
        ({"functions": []}, "functions", "Unrecognized request argument supplied: functions"),
    ],
)
def test_unsupported_or_invalid_fields_are_named(fields, param, words):
    message, named = rejection(ChatCompletionRequest, {"model": "m", "messages": USER, **fields})
    assert named == param
    assert param.split("[")[0].split(".")[0] in message and words in message


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([], "messages", "at least 1 item"),
        ("hello", "messages", "valid list"),
        ([{"role": "robot", "content": "x"}], "messages[0]", "'robot'"),
        ([{"content": "x"}], "messages[0]", "discriminator 'role'"),
        ([{"role": "user"}], "messages[0].content", "Field required"),
        ([{"role": "user", "content": 5}], "messages[0].content", "valid string, or Input should be a valid list"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "Field required"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}],
            "messages[0].content",
            "type 'image_url'",
        ),
        ([{"role": "user", "content": "x", "mood": "happy"}], "messages[0].mood", "Extra inputs"),
        ([{"role": "assistant", "content": None}], "messages[0]", "needs content or tool_calls"),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}],
            "messages[0].tool_calls[0].function.arguments",
            "JSON object",
        ),
        ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", "Field required"),
    ],
)
def test_bad_messages_are_named_by_index(messages, param, words):
    message, named = rejection(ChatCompletionRequest, {"model": "m", "messages": messages})
    assert named == param
    assert message.startswith(param) and words in message


def test_messages_become_template_input():
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}, KIND_PART]},
                {"role": "user", "content": "weather?", "name": "ana"},
                {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [OSLO_CALL],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "9 C"},
            ],
            "tools": [WEATHER_TOOL],
        }
    )
    assert request.template_messages() == [
        {"role": "system", "content": "be brief\nkind"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [OSLO_CALL],
        },
        {"role": "tool", "content": "9 C", "tool_call_id": "c1"},
    ]
    assert request.template_tools() == [WEATHER_TOOL]


def test_tool_choice_none_keeps_tools_out_of_the_prompt():
    request = chat(tools=[WEATHER_TOOL], tool_choice="none")
    assert not request.uses_tools and request.template_tools() is None


@pytest.mark.parametrize(
    "prompt, param, words",
    [
        ([], "prompt", "must not be empty"),
        (["a", "b"], "prompt", "batches are not supported"),
        ([[1, 2]], "prompt[0]", "valid integer"),
        (None, "prompt", ""),
    ],
)
def test_bad_completion_prompts_are_named(prompt, param, words):
    message, named = rejection(CompletionRequest, {"model": "m", "prompt": prompt})
    assert named == param and words in message


@pytest.mark.parametrize(
    "fields, param",
    [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs")],
)
def test_unsupported_completion_fields_are_named(fields, param):
    _, named = rejection(CompletionRequest, {"model": "m", "prompt": "x", **fields})
    assert named == param


def test_completion_prompt_forms():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [5, 6]}).prompt == [5, 6]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["once"]}).prompt == ["once"]


def test_nan_is_not_a_temperature():
    _, named = rejection(ChatCompletionRequest, {"model": "m", "messages": USER, "temperature": float("nan")})
    assert named == "temperature"


def test_sampling_params_use_openai_defaults_and_pass_the_rest():
    default = sampling_params(chat(), max_tokens=7)
    assert (default.max_tokens, default.temperature, default.top_p, default.top_k, default.seed, default.stop) == (
        7,
        1.0,
        1.0,
        0,
        None,
        (),
    )
    chosen = sampling_params(chat(temperature=0, top_p=0.5, top_k=3, seed=11, stop="END"), max_tokens=2)
    assert (chosen.temperature, chosen.top_p, chosen.top_k, chosen.seed, chosen.stop) == (0.0, 0.5, 3, 11, ("END",))
    assert chosen.greedy


def test_usage_counts_cached_tokens_where_the_prefill_ran():
    remote = RequestStats("remote", "nvfp4", cached_tokens_prefill=32, cached_tokens_decode=16, kv_transfer_bytes=100)
    local = RequestStats("local", "bf16", cached_tokens_decode=48)
    assert usage_of(100, 5, remote).prompt_tokens_details.cached_tokens == 32
    assert usage_of(100, 5, local).prompt_tokens_details.cached_tokens == 48
    assert usage_of(100, 5, None).model_dump() == {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "total_tokens": 105,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert MixquantStats.from_stats(remote).kv_transfer_bytes == 100


# ---------------------------------------------------------------------------------------------- tool calls


def block(name: str, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_tool_call_blocks_are_parsed_with_the_text_outside():
    text = "Let me check.\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {}) + "\n"
    parsed = parse_tool_calls(text, model_stopped=True)
    calls = [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert parsed.content.strip() == "Let me check."
    assert len({c.id for c in parsed.tool_calls}) == 2 and all(c.id.startswith("call_") for c in parsed.tool_calls)


def test_arguments_given_as_a_json_string_are_normalised():
    parsed = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', model_stopped=True)
    assert parsed.tool_calls[0].arguments == '{"x": 1}'


@pytest.mark.parametrize(
    "text",
    [
        "no calls here",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        block("f", {}) + "<tool_call>{broken",
    ],
)
def test_unparseable_output_stays_content(text):
    parsed = parse_tool_calls(text, model_stopped=True)
    assert parsed.tool_calls == [] and parsed.content == text


def test_an_unclosed_final_block_counts_only_when_the_model_stopped():
    text = 'Sure <tool_call>\n{"name": "f", "arguments": {"a": 1}}'
    assert [c.name for c in parse_tool_calls(text, model_stopped=True).tool_calls] == ["f"]
    assert parse_tool_calls(text, model_stopped=False).tool_calls == []


def test_stream_filter_holds_back_tags_and_settles_at_the_end():
    text = "Checking" + " now " + block("get_weather", {"city": "Oslo"}) + " done"
    pieces = ["Check", "ing now <", "tool_", "call>\n{\"name\"", text[len("Checking now <tool_call>\n{\"name\""):]]
    assert "".join(pieces) == text
    stream = ToolCallStreamFilter()
    forwarded = "".join(stream.push(piece) for piece in pieces)
    assert forwarded == "Checking now "
    rest, calls = stream.finish(model_stopped=True)
    assert rest == " done" and [c.name for c in calls] == ["get_weather"]


def test_stream_filter_releases_held_text_that_is_not_a_call():
    stream = ToolCallStreamFilter()
    forwarded = stream.push("a <tool") + stream.push("box> b <tool_call>{oops")
    assert forwarded == "a <toolbox> b "
    rest, calls = stream.finish(model_stopped=True)
    assert calls == [] and forwarded + rest == "a <toolbox> b <tool_call>{oops"

"""`mixquant load` without a server: sessions, SSE timing over httpx.MockTransport, bounds, summary, JSON, plot.

The real app run is in tests/cpu/test_dashboard.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from mixquant_serve.cli import main
from mixquant_serve.loadgen.client import stream_chat_turn, stream_completion_turn
from mixquant_serve.loadgen.report import format_summary, plot_png, summarize, write_json
from mixquant_serve.loadgen.runner import LoadConfig, LoadRun, run_load
from mixquant_serve.loadgen.sessions import TOKEN_ID_LOW, AgentSession, TokenAgentSession, system_prompt, tool_result
from mixquant_serve.loadgen.client import TurnResult


def test_session_history_grows_with_replies_and_tool_results():
    session = AgentSession("s1", turns=3, tool_result_tokens=200, seed=5)
    first = session.messages()
    assert [m["role"] for m in first] == ["system", "user"] and "search_logs" in first[0]["content"]
    session.add_reply("CALL search_logs {}")
    second = session.messages()
    assert second[:2] == first and [m["role"] for m in second[2:]] == ["assistant", "user"]
    assert second[3]["content"].startswith("Tool `")
    session.add_reply("CALL query_metrics {}")
    session.add_reply("done")
    assert session.finished and len(session.messages()) == 2 + 2 + 2 + 1  # the last reply ends the session
    with pytest.raises(ValueError, match="add_reply"):
        session.add_reply("more")
    again = AgentSession("s2", turns=3, tool_result_tokens=200, seed=5)
    again.add_reply("CALL search_logs {}")
    assert again.messages() == second  # seeded: the same run twice


def test_system_prompt_lists_the_tools_and_tool_results_are_json():
    import random

    assert "Tools:" in system_prompt() and "run_sql" in system_prompt()
    records = json.loads(tool_result(random.Random(0), 400))
    assert isinstance(records, list) and len(records) > 1 and set(records[0]) == {"ts", "svc", "lvl", "ms", "code"}
    with pytest.raises(ValueError, match="num_tokens"):
        tool_result(random.Random(0), 0)


def sse(*events) -> bytes:
    return b"".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n".encode() for e in events)


def chat_stream_handler(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert request.headers["x-session-id"].startswith("load-") or request.headers["x-session-id"] == "s"
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}], "mixquant": {"prefill": "remote"}},
        {"choices": [], "usage": {"prompt_tokens": 120, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 96}}},
        "[DONE]",
    ]
    return httpx.Response(200, content=sse(*events), headers={"content-type": "text/event-stream"})


def mock_client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_stream_turn_reads_text_usage_and_where_prefill_ran():
    async def go():
        async with mock_client(chat_stream_handler) as client:
            return await stream_chat_turn(client, "http://x", "m", [{"role": "user", "content": "hi"}], 8, "s", 1)

    result = asyncio.run(go())
    assert result.ok and result.text == "Hello" and result.error is None
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens, result.prefill) == (120, 2, 96, "remote")
    assert result.ttft_s is not None and len(result.itl_s) == 1 and result.e2e_s >= result.ttft_s


def test_stream_turn_reports_http_and_stream_errors():
    async def go(handler):
        async with mock_client(handler) as client:
            return await stream_chat_turn(client, "http://x", "m", [], 8, "s", 1)

    refused = asyncio.run(go(lambda r: httpx.Response(503, json={"error": {"message": "busy"}})))
    assert not refused.ok and refused.error.startswith("http 503")
    broken = asyncio.run(go(lambda r: httpx.Response(200, content=sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "died"}}))))
    assert not broken.ok and "died" in broken.error


def test_run_load_is_bounded_by_request_count(monkeypatch):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served-model"}]})
        calls.append(json.loads(request.content))
        return chat_stream_handler(request)

    real_client = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    config = LoadConfig("http://x", concurrency=3, turns=2, think_time_s=0.0, tool_result_tokens=50, duration_s=None, max_requests=7)
    run = asyncio.run(run_load(config))
    assert len(run.results) == len(calls) == 7 and run.model == "served-model"
    assert all(body["model"] == "served-model" for body in calls)
    by_session = {}
    for r in run.results:
        by_session.setdefault(r.session_id, []).append(r.turn)
    assert all(turns == list(range(1, len(turns) + 1)) and len(turns) <= 2 for turns in by_session.values())
    summary = summarize(run)
    assert summary["ok"] == 7 and summary["cache_hit_share"] == pytest.approx(96 / 120) and summary["prefills"] == {"remote": 7}


def test_config_needs_a_bound_and_sane_values():
    with pytest.raises(ValueError, match="bound"):
        LoadConfig("http://x", duration_s=None, max_requests=None)
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig("http://x", concurrency=0)
    assert main(["load", "--url", "http://x", "--concurrency", "0", "--no-progress"]) == 2


def fake_run() -> LoadRun:
    rng = np.random.default_rng(0)
    results = []
    for i in range(50):
        ttft = float(rng.uniform(0.1, 1.0))
        itl = rng.uniform(0.01, 0.05, 5).tolist()
        results.append(TurnResult(f"s{i % 5}", i // 5 + 1, 1000.0 + i, True, None, ttft, itl, ttft + sum(itl), "x", 100, 6, 50, "local"))
    results.append(TurnResult("s9", 1, 1050.0, False, "http 503: busy", e2e_s=0.2))
    return LoadRun(LoadConfig("http://x", max_requests=51), "m", 1000.0, 1060.0, results, 6)


def test_summary_percentiles_throughput_and_errors():
    run = fake_run()
    summary = summarize(run)
    ok = [r for r in run.results if r.ok]
    assert summary["ttft_s"]["p90"] == pytest.approx(np.percentile([r.ttft_s for r in ok], 90))
    assert summary["itl_s"]["p50"] == pytest.approx(np.percentile([g for r in ok for g in r.itl_s], 50))
    assert summary["errors"] == 1 and summary["errors_by_kind"] == {"http 503": 1}
    assert summary["requests_per_s"] == pytest.approx(50 / 60) and summary["cache_hit_share"] == pytest.approx(0.5)
    text = format_summary(summary)
    assert "TTFT" in text and "ITL" in text and "errors: {'http 503': 1}" in text


def test_json_and_png_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    run = fake_run()
    write_json(run, summarize(run), tmp_path / "run.json")
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["summary"]["ok"] == 50 and len(saved["turns"]) == 51 and "text" not in saved["turns"][0]
    plot_png(run, tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_token_session_grows_by_reply_ids_and_seeded_tool_results():
    session = TokenAgentSession("t1", turns=3, tool_result_tokens=100, seed=7, vocab_limit=1000)
    first = session.prompt()
    assert len(first) == 100 and all(TOKEN_ID_LOW <= t < 1000 for t in first)
    session.add_reply([5, 6, 7])
    second = session.prompt()
    assert second[:100] == first and second[100:103] == [5, 6, 7] and len(second) == 203
    session.add_reply([8])
    session.add_reply([9])
    assert session.finished and session.prompt()[-1] == 9  # no tool result after the last reply
    with pytest.raises(ValueError, match="add_reply"):
        session.add_reply([1])
    again = TokenAgentSession("t2", turns=3, tool_result_tokens=100, seed=7, vocab_limit=1000)
    again.add_reply([5, 6, 7])
    assert again.prompt() == second
    with pytest.raises(ValueError, match="vocab_limit"):
        TokenAgentSession("t3", turns=1, tool_result_tokens=1, seed=0, vocab_limit=TOKEN_ID_LOW)


def completion_ids_handler(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "synthetic"}]})
    body = json.loads(request.content)
    assert request.url.path == "/v1/completions" and isinstance(body["prompt"], list)
    assert body["return_token_ids"] is True and body["ignore_eos"] is True and body["stream"]
    stats = {"prefill": "remote", "kv_transfer_bytes": 4_000_000, "kv_transfer_ms": 2.0, "prefill_ms": 30.0}
    events = [
        {"choices": [{"text": "", "token_ids": [11]}]},
        {"choices": [{"text": "", "token_ids": [12]}]},
        {"choices": [{"text": "", "token_ids": [13], "finish_reason": "length"}], "mixquant": stats},
        {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3}},
        "[DONE]",
    ]
    return httpx.Response(200, content=sse(*events), headers={"content-type": "text/event-stream"})


def test_completion_turn_times_token_id_events_and_reads_transfer_stats():
    async def go():
        async with mock_client(completion_ids_handler) as client:
            return await stream_completion_turn(client, "http://x", "m", [300, 301], 3, "s", 1)

    result = asyncio.run(go())
    assert result.ok and result.token_ids == [11, 12, 13] and result.text == ""
    assert result.ttft_s is not None and len(result.itl_s) == 2
    assert (result.kv_transfer_bytes, result.kv_transfer_ms, result.prefill_ms, result.prefill) == (4_000_000, 2.0, 30.0, "remote")


def test_token_mode_load_resends_history_with_reply_ids(monkeypatch):
    prompts = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/models":
            prompts.append(json.loads(request.content)["prompt"])
        return completion_ids_handler(request)

    real_client = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    config = LoadConfig("http://x", concurrency=1, turns=2, think_time_s=0.0, tool_result_tokens=20, duration_s=None,
                        max_requests=2, prompt_mode="tokens", vocab_limit=5000)
    run = asyncio.run(run_load(config))
    assert [len(p) for p in prompts] == [20, 43] and prompts[1][:20] == prompts[0] and prompts[1][20:23] == [11, 12, 13]
    summary = summarize(run, ttft_target_s=10.0, itl_target_s=10.0)
    assert summary["kv_transfer"]["requests"] == 2 and summary["kv_transfer"]["gb_per_s"]["p50"] == pytest.approx(2.0)
    assert summary["goodput"]["requests_meeting"] == 2
    with pytest.raises(ValueError, match="prompt_mode"):
        LoadConfig("http://x", prompt_mode="audio")


def test_goodput_counts_requests_meeting_both_targets():
    run = fake_run()
    ok = [r for r in run.results if r.ok]
    summary = summarize(run, ttft_target_s=0.5, itl_target_s=0.03)
    expected = [r for r in ok if r.ttft_s <= 0.5 and sum(r.itl_s) / len(r.itl_s) <= 0.03]
    assert 0 < len(expected) < len(ok)
    assert summary["goodput"]["requests_meeting"] == len(expected)
    assert summary["goodput"]["requests_per_s"] == pytest.approx(len(expected) / 60)
    assert "goodput" in format_summary(summary) and summarize(run)["goodput"] is None
    assert summary["kv_transfer"] is None  # no request pulled KV

"""What a load run measured: percentiles, throughput, errors, cache hits; as text, JSON and a PNG plot."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mixquant_serve.loadgen.client import TurnResult
from mixquant_serve.loadgen.runner import LoadRun
from mixquant_serve.metrics import percentiles

QUANTILES = (50, 90, 99)


def summarize(run: LoadRun, ttft_target_s: float | None = None, itl_target_s: float | None = None) -> dict[str, Any]:
    """Percentiles and rates of a run. With both targets, goodput: requests per second that finished with
    TTFT <= ttft_target_s and a mean inter-token latency (time per output token) <= itl_target_s."""
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    duration = max(run.finished_at - run.started_at, 1e-9)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "model": run.model,
        "base_url": run.config.base_url,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration_s": duration,
        "sessions": run.sessions_started,
        "requests": len(run.results),
        "ok": len(ok),
        "errors": len(failed),
        "errors_by_kind": dict(Counter((r.error or "unknown").split(":")[0] for r in failed)),
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None], QUANTILES),
        "itl_s": percentiles([g for r in ok for g in r.itl_s], QUANTILES),
        "e2e_s": percentiles([r.e2e_s for r in ok], QUANTILES),
        "requests_per_s": len(ok) / duration,
        "prompt_tokens_per_s": prompt_tokens / duration,
        "generation_tokens_per_s": sum(r.completion_tokens for r in ok) / duration,
        "cache_hit_share": sum(r.cached_tokens for r in ok) / prompt_tokens if prompt_tokens else None,
        "prefills": dict(Counter(r.prefill for r in ok if r.prefill is not None)),
        "kv_transfer": transfer_summary(ok),
        "goodput": goodput(ok, duration, ttft_target_s, itl_target_s),
    }


def transfer_summary(ok: list[TurnResult]) -> dict[str, Any] | None:
    """KV pulls as the server reported them: bytes, GB/s per request, and the pull's share of TTFT."""
    pulled = [r for r in ok if r.kv_transfer_bytes > 0 and r.kv_transfer_ms > 0]
    if not pulled:
        return None
    return {
        "requests": len(pulled),
        "bytes_total": sum(r.kv_transfer_bytes for r in pulled),
        "bytes_per_request": percentiles([float(r.kv_transfer_bytes) for r in pulled], QUANTILES),
        "gb_per_s": percentiles([r.kv_transfer_bytes / r.kv_transfer_ms / 1e6 for r in pulled], QUANTILES),
        "ms": percentiles([r.kv_transfer_ms for r in pulled], QUANTILES),
        "share_of_ttft": percentiles(
            [r.kv_transfer_ms / 1e3 / r.ttft_s for r in pulled if r.ttft_s], QUANTILES
        ),
    }


def goodput(ok: list[TurnResult], duration_s: float, ttft_target_s: float | None, itl_target_s: float | None
            ) -> dict[str, Any] | None:
    if ttft_target_s is None or itl_target_s is None:
        return None
    met = [
        r for r in ok
        if r.ttft_s is not None and r.ttft_s <= ttft_target_s and (not r.itl_s or sum(r.itl_s) / len(r.itl_s) <= itl_target_s)
    ]
    return {
        "ttft_target_s": ttft_target_s,
        "itl_target_s": itl_target_s,
        "requests_meeting": len(met),
        "share": len(met) / len(ok) if ok else None,
        "requests_per_s": len(met) / duration_s,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:9.1f}"


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"model {summary['model']} at {summary['base_url']}: {summary['requests']} requests "
        f"({summary['ok']} ok, {summary['errors']} errors) in {summary['duration_s']:.1f} s, {summary['sessions']} sessions",
        f"{'ms':>10} {'p50':>9} {'p90':>9} {'p99':>9}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        q = summary[key]
        lines.append(f"{label:>10} {_ms(q['p50'])} {_ms(q['p90'])} {_ms(q['p99'])}")
    share = summary["cache_hit_share"]
    lines += [
        f"throughput: {summary['requests_per_s']:.2f} requests/s, {summary['prompt_tokens_per_s']:.0f} prompt tokens/s, "
        f"{summary['generation_tokens_per_s']:.1f} generated tokens/s",
        f"prefix-cache hit share: {'-' if share is None else f'{share:.1%}'} of prompt tokens; prefills {summary['prefills'] or '-'}",
    ]
    transfer = summary.get("kv_transfer")
    if transfer:
        lines.append(
            f"KV pulls: {transfer['requests']} requests, {transfer['bytes_total'] / 1e9:.2f} GB; GB/s per request "
            f"p50 {transfer['gb_per_s']['p50']:.1f}, p99 {transfer['gb_per_s']['p99']:.1f}; share of TTFT p50 "
            f"{transfer['share_of_ttft']['p50'] or 0:.1%}"
        )
    good = summary.get("goodput")
    if good:
        lines.append(
            f"goodput (TTFT <= {good['ttft_target_s'] * 1e3:.0f} ms, mean ITL <= {good['itl_target_s'] * 1e3:.0f} ms): "
            f"{good['requests_per_s']:.2f} requests/s ({good['requests_meeting']} of {summary['ok']} ok requests)"
        )
    if summary["errors"]:
        lines.append(f"errors: {summary['errors_by_kind']}")
    return "\n".join(lines)


def write_json(run: LoadRun, summary: dict[str, Any], path: Path) -> None:
    """The summary, the configuration and every turn (without its text and token ids)."""
    turns = [{k: v for k, v in asdict(r).items() if k not in ("text", "token_ids")} for r in run.results]
    payload = {"summary": summary, "config": asdict(run.config), "turns": turns}
    if payload["config"].get("api_key"):
        payload["config"]["api_key"] = "(set)"
    path.write_text(json.dumps(payload, indent=1))


def plot_png(run: LoadRun, path: Path) -> None:
    """TTFT and E2E of every turn over time, and its mean ITL (needs matplotlib: `pip install mixquant-serve[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot: matplotlib is not installed; pip install 'mixquant-serve[plot]'") from None
    ok = [r for r in run.results if r.ok]
    t = [r.started_at - run.started_at for r in ok]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.scatter(t, [r.e2e_s for r in ok], s=10, label="E2E", color="#9ca3af")
    top.scatter(t, [r.ttft_s for r in ok], s=10, label="TTFT", color="#2563eb")
    top.set_ylabel("seconds")
    top.legend(loc="upper left")
    top.set_title(f"{run.model}: {len(ok)} ok turns, {len(run.results) - len(ok)} errors")
    itl = [(x, sum(r.itl_s) / len(r.itl_s)) for x, r in zip(t, ok) if r.itl_s]
    bottom.scatter([x for x, _ in itl], [v * 1e3 for _, v in itl], s=10, color="#16a34a", label="mean ITL per turn")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds since start (turn start)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

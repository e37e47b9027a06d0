"""Property-based fuzzing of a running Router with schemathesis, driven by its own /openapi.json.

    python -m benchmarks.fuzz_router --base-url http://127.0.0.1:8000 --cases 500 [--api-key-file keys.txt]

Every operation of the schema gets generated requests, valid ones (positive mode: bodies that match
the request models) and invalid ones (negative mode: wrong types, missing fields, junk), in
proportion to `FUZZ_SHARE`. Each request must be answered, within `REQUEST_TIMEOUT_S`, with a
status below 500: a 5xx or a timeout (a hang) is a failure. Keep generation cheap by fuzzing an app
whose `router.max_tokens_cap` is small. tests/cpu/test_faults.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from dataclasses import dataclass, field

REQUEST_TIMEOUT_S = 120.0  # a request unanswered this long counts as a hang
# operation label -> share of the cases (the POST bodies carry nearly all of the input space)
FUZZ_SHARE = {
    "POST /v1/chat/completions": 0.55,
    "POST /v1/completions": 0.37,
    "GET /v1/models": 0.04,
    "GET /health": 0.04,
}
OTHER_ROUTE_SHARE = 0.02  # routes added later (dashboards, metrics): a few requests each
BODY_SHARE = FUZZ_SHARE["POST /v1/chat/completions"] + FUZZ_SHARE["POST /v1/completions"]
MAX_FAILURES_KEPT = 20


@dataclass
class FuzzReport:
    """What a fuzz run sent and how the server answered."""

    num_requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)  # 5xx and hangs, with the request that caused them
    seconds: float = 0.0

    @property
    def num_server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if isinstance(status, int) and status >= 500)

    @property
    def num_hangs(self) -> int:
        return self.statuses.get("timeout", 0)

    def summary(self) -> dict:
        return {
            "requests": self.num_requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
            "server_errors": self.num_server_errors,
            "hangs": self.num_hangs,
            "seconds": round(self.seconds, 1),
            "failures": self.failures[:MAX_FAILURES_KEPT],
        }


def run_fuzz(base_url: str, num_cases: int, headers: dict[str, str] | None = None, seed: int = 0) -> FuzzReport:
    """Sends about `num_cases` generated requests to the Router at `base_url` (its /openapi.json drives them)."""
    import httpx
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    if num_cases < len(FUZZ_SHARE):
        raise ValueError(f"num_cases must be >= {len(FUZZ_SHARE)}, got {num_cases}")
    schema_doc = httpx.get(f"{base_url}/openapi.json", headers=headers or {}, timeout=60).json()
    served = httpx.get(f"{base_url}/v1/models", headers=headers or {}, timeout=60).json()["data"][0]["id"]
    pin_model_name(schema_doc, served)
    schema = schemathesis.openapi.from_dict(schema_doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    report = FuzzReport()
    started = time.perf_counter()
    session = requests.Session()
    round_index = 0
    # Hypothesis stops early once an input space is exhausted (GET routes have one request): top up the
    # bodies' operations until the requested number of requests went out.
    while report.num_requests < num_cases:
        wanted = num_cases - report.num_requests
        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            share = FUZZ_SHARE.get(label, OTHER_ROUTE_SHARE)
            if round_index and not operation.body:
                continue
            budget = max(1, round(wanted * share / (1.0 if not round_index else BODY_SHARE)))
            modes = [schemathesis.GenerationMode.POSITIVE]
            if operation.body:  # only bodies have an invalid space worth exploring
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for index, mode in enumerate(modes):
                examples = budget // len(modes) + (budget % len(modes) if index == 0 else 0)
                if examples < 1:  # a budget of 1 covers the positive mode only
                    continue
                _fuzz_operation(operation.as_strategy(generation_mode=mode), examples, base_url, headers or {},
                                session, report, seed + 100 * round_index + index, given, settings, HealthCheck,
                                Phase, hypothesis_seed)
        round_index += 1
    report.seconds = time.perf_counter() - started
    return report


def pin_model_name(schema_doc: dict, served_model: str) -> None:
    """Valid bodies name the served model (else nearly all would stop at 404); invalid ones still get any value."""
    for model_name in ("ChatCompletionRequest", "CompletionRequest"):
        schema_doc["components"]["schemas"][model_name]["properties"]["model"] = {"type": "string", "enum": [served_model]}


def _fuzz_operation(strategy, examples, base_url, headers, session, report, seed, given, settings, HealthCheck,
                    Phase, hypothesis_seed) -> None:
    """Runs hypothesis over one operation's strategy, recording every answer (no shrinking: failures are kept)."""
    import requests

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case) -> None:
        report.num_requests += 1
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            report.statuses["timeout"] += 1
            report.failures.append(f"hang: {case.method} {case.path} body={_short(case.body)}")
            return
        report.statuses[response.status_code] += 1
        if response.status_code >= 500:
            report.failures.append(
                f"{response.status_code}: {case.method} {case.path} body={_short(case.body)} -> {response.text[:300]}"
            )

    one()


def _short(body: object) -> str:
    try:
        text = json.dumps(body, default=str)
    except (TypeError, ValueError):
        text = repr(body)
    return text[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="The Router, e.g. http://127.0.0.1:8000")
    parser.add_argument("--cases", type=int, default=500, help="Generated requests in all (default 500).")
    parser.add_argument("--api-key-file", default=None, help="File whose first key line is sent as Bearer token.")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed.")
    args = parser.parse_args()
    headers = {}
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as keys:
            key = next(line.strip() for line in keys if line.strip() and not line.startswith("#"))
        headers["Authorization"] = f"Bearer {key}"
    report = run_fuzz(args.base_url, args.cases, headers, args.seed)
    print(json.dumps(report.summary(), indent=2))
    raise SystemExit(1 if report.num_server_errors or report.num_hangs else 0)


if __name__ == "__main__":
    main()

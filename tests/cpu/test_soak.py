"""A short soak on the shared CPU default app: multi-turn sessions, no 5xx, no leaked KV block, flat memory.

The full run (200 sessions at concurrency 16) is `python -m benchmarks.soak --start`; this CI version
drives 8 sessions of 2 turns at concurrency 4 through the same code (~1-3 min on 2 shared cores).
"""

from __future__ import annotations

import json

import pytest

from benchmarks.soak import SoakSettings, run_soak

pytestmark = pytest.mark.slow

CI_SETTINGS = SoakSettings(sessions=8, concurrency=4, turns=2, max_tokens=8, seed=1)
MEMORY_GROWTH_LIMIT = 1.5  # end over warm-up resident memory of each replica; a leak per request would pass it


def test_short_soak_has_no_server_errors_no_leaked_blocks_and_flat_memory(default_app):
    report = run_soak(default_app, "mixquant", CI_SETTINGS)
    summary = report.summary()
    print("soak:", json.dumps(summary))
    assert len(report.records) == CI_SETTINGS.sessions * CI_SETTINGS.turns
    assert report.num_server_errors == 0, summary["statuses"]
    assert summary["statuses"] == {"200": len(report.records)}
    assert summary["prefill"].get("remote", 0) > 0  # KV moved over NIXL under load, not only local prefills
    assert report.leaked_blocks == {}
    assert {name.split("#")[0] for name in report.memory_mib} == {"Router", "PrefillWorker", "DecodeWorker"}
    for name, memory in report.memory_mib.items():
        assert memory["end"] <= MEMORY_GROWTH_LIMIT * memory["warm"], (name, memory)

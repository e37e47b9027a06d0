"""Runs Triton kernels on CPU: a child Python under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and the test process has usually
imported it already (kernels are imported by the modules under test), so each interpreted check runs
as a script in a child process with the variable set and the repository on its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def run_interpreted(code: str) -> str:
    """Runs `code` under TRITON_INTERPRET=1; returns its stdout, failing the test with both outputs on error."""
    import pytest

    pytest.importorskip("triton")
    path = [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"interpreted check failed\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result.stdout

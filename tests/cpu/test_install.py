"""Packaging facts: our top-level `kernels` package must not pass for the Hugging Face kernels hub,
and the README's test command is the one CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_transformers_does_not_take_our_kernels_package_for_the_hub():
    # A fresh interpreter started in the repo root, where `kernels` is importable both from the
    # install and from the working directory.
    code = (
        "import importlib.util, kernels;"
        "assert importlib.util.find_spec('kernels') is not None;"
        "from transformers.utils.import_utils import is_kernels_available;"
        "print(is_kernels_available())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [c for c in commands if "pytest" in c]
    assert test_commands, "README has no test command"
    assert test_commands[0].strip() in ci

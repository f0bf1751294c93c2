"""Run a test file's interpreter tests in a child pytest with TRITON_INTERPRET=1.

The interpreter must be switched on before Triton kernels are defined, so the Triton-path
tests that CI runs on the CPU (``test_interp_*``) execute in a child process; in the parent
they skip with a reason that says so. One helper for every file that has such tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_interpreter_tests(test_file: str, keyword: str, *, min_passed: int = 1,
                          exact_passed: int | None = None, timeout: int = 900) -> None:
    """pytest ``test_file -k keyword`` under TRITON_INTERPRET=1 (our kernels, not FA4): the
    child must pass, run at least ``min_passed`` (or exactly ``exact_passed``) tests and skip
    none."""
    env = dict(os.environ, TRITON_INTERPRET="1", TORCH_VARLEN_ATTENTION_BACKEND="torch_varlen")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k", keyword],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed, tail
    count = int(passed.group(1))
    assert count == exact_passed if exact_passed is not None else count >= min_passed, tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail

"""The README's quickstart: its two commands are the scripts, and the first prints a greedy completion
from the bundled default model."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quickstart_names_the_two_scripts():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/serve.sh", "bash scripts/test.sh"]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "scripts/test.sh" in ci


@pytest.mark.slow
def test_first_command_prints_a_greedy_completion():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    proc = subprocess.run(["bash", "scripts/serve.sh", "--prompt", "What is the capital of France?",
                           "--max-tokens", "12"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"Completion: (.+)", proc.stdout)
    assert match and "Paris" in match.group(1), proc.stdout[-2000:]

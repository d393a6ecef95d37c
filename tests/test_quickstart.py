"""The README's quickstart: its two commands are the scripts; the first starts the OpenAI server on the
bundled default model, which then answers a greedy chat completion."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quickstart_names_the_two_scripts():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/serve.sh", "bash scripts/test.sh"]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "scripts/test.sh" in ci


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_first_command_serves_a_greedy_completion():
    from openai import OpenAI

    port = _free_port()
    # The suite's common engine shapes, so the persistent compilation cache is shared with other tests.
    proc = subprocess.Popen(["bash", "scripts/serve.sh", "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "2048", "--max-num-seqs", "32",
                             "--num-gpu-blocks-override", "2048"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=12)
        text = reply.choices[0].message.content
        print(f"Completion: {text}")
        assert "Paris" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

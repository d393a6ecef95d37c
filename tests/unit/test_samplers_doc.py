"""The example in docs/samplers.md runs as written (it carries its own asserts)."""
import re
from pathlib import Path

from aphrodite_jax.sampling.registry import unregister_sampler

DOC = Path(__file__).resolve().parents[2] / "docs" / "samplers.md"


def test_docs_sampler_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    body = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(body) < 40  # "a new sampler added in under 40 lines"
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "samplers_doc"})
    finally:
        unregister_sampler("logit_cap")

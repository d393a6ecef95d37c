"""AsyncLLMEngine on the real default model: streams, validation errors and aborts through asyncio."""
from __future__ import annotations

import asyncio

import pytest

from aphrodite_jax import SamplingParams
from aphrodite_jax.engine.async_engine import AsyncLLMEngine, RequestAbortedError
from aphrodite_jax.engine.llm_engine import PromptTooLongError
from engine_utils import assert_all_pages_free, generate_tokens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


def test_streams_equal_offline_and_abort_frees_pages(llm):
    prompts = [[100 + i, 200, 300 + i] for i in range(4)]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = generate_tokens(llm, prompts, [sp] * 4)
    engine = AsyncLLMEngine(llm.engine)

    async def collect(i):
        outs = [o async for o in engine.generate(None, sp, f"r{i}", prompt_token_ids=prompts[i])]
        return outs

    async def abort_midway():
        agen = engine.generate(None, SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True),
                               "long", prompt_token_ids=[5, 6, 7])
        seen = 0
        async for _ in agen:
            seen += 1
            if seen == 3:
                break  # leaving the iterator aborts the request
        await agen.aclose()
        return seen

    async def aborted_by_someone_else():
        """abort() from another task ends the reader's stream instead of leaving it waiting."""
        seen = 0
        with pytest.raises(RequestAbortedError):
            async for _ in engine.generate(None, SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True),
                                           "other", prompt_token_ids=[8, 9, 10]):
                seen += 1
                if seen == 2:
                    await engine.abort("other")
        return seen

    async def too_long():
        with pytest.raises(PromptTooLongError):
            await engine.add_request("bad", None, sp, prompt_token_ids=[1] * 5000)

    async def main():
        results = await asyncio.wait_for(asyncio.gather(*(collect(i) for i in range(4)), abort_midway(),
                                                        too_long(), aborted_by_someone_else()), 600)
        return results

    try:
        results = asyncio.run(main())
        for i in range(4):
            stream = results[i]
            assert stream[-1].finished and all(not o.finished for o in stream[:-1])
            lens = [len(o.outputs[0].token_ids) for o in stream]
            assert lens == sorted(lens)  # cumulative outputs grow
            assert stream[-1].outputs[0].token_ids == want[i]
        assert results[4] == 3
        assert 2 <= results[6] < 500
        # The abort reaches the engine thread on its next loop; wait for the queues to drain.
    finally:
        engine.shutdown()
    assert_all_pages_free(llm)

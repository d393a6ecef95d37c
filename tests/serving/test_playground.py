"""The playground at `/`, in headless system Chromium driven by Playwright, sends a
chat message and shows the reply streamed from the real model (several growing updates, the same text
the API gives for the same request)."""
from __future__ import annotations

import shutil

import openai
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian package `chromium`; .ci/run installs it)")
def test_playground_chat_streams_a_reply(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    message = "Say hello in one short sentence."
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            posted, errors = [], []
            page.on("request", lambda r: posted.append(r.post_data_json) if r.method == "POST" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.base_url + "/")
            assert page.title() == "aphrodite-jax playground"
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            # Record every text the reply shows while it streams in.
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const last = document.querySelector('.msg.assistant:last-child .content');
                    if (last) window.seen.push(last.textContent);
                }).observe(document.getElementById('transcript'),
                           {childList: true, subtree: true, characterData: true});
            }""")
            page.fill("#input", message)
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=120_000)
            reply = page.text_content(".msg.assistant .content")
            seen = page.evaluate("window.seen")
            status = page.text_content("#status")
        finally:
            browser.close()
    assert not errors, errors
    assert posted and posted[-1]["stream"] is True and posted[-1]["messages"][-1]["content"] == message
    assert reply and status.startswith("done")
    growing = [t for t in dict.fromkeys(seen) if t]
    assert len(growing) >= 2, f"the reply did not stream: {seen}"
    assert all(reply.startswith(t) for t in growing)  # each update extended the text
    # The same request through the API gives the same greedy reply: it came from the model.
    with openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0) as client:
        body = {k: v for k, v in posted[-1].items() if k not in ("model", "messages", "max_tokens",
                                                                   "temperature", "stream")}
        ref = client.chat.completions.create(model=posted[-1]["model"], messages=posted[-1]["messages"],
                                             max_tokens=12, temperature=0, extra_body=body)
    assert reply == ref.choices[0].message.content

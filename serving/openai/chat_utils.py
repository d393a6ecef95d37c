"""Chat templates: resolve --chat-template (file or inline), render conversations with HF's Jinja code.

The precedence is per-request `chat_template`, then the server's --chat-template, then the model's own.
A model without any template still serves completions; chat answers a 400.
"""
from __future__ import annotations

import codecs
import json
import os
from typing import Any, Optional

from serving.openai.errors import APIError

NO_TEMPLATE_MESSAGE = ("As of transformers v4.44, default chat template is no longer allowed, so you must "
                       "provide a chat template if the tokenizer does not define one (this model has none: pass "
                       "--chat-template or a per-request `chat_template`).")


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """A path to a file holding the template, or the template itself (escape sequences unescaped)."""
    if not value:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if any(c in value for c in "{%") or "\\" in value:
        if "\\" in value and value.isascii():
            return codecs.decode(value, "unicode_escape")
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def message_text(content: Any) -> str:
    """A message's content as one string: text parts joined with newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type != "text":
            raise APIError(f"messages: unknown content part type: {part.type}", 400, "messages")
        texts.append(part.text or "")
    return "\n".join(texts)


def conversation(messages: list) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m.role, "content": message_text(m.content)}
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        if m.tool_calls is not None:
            msg["tool_calls"] = [_templated_call(c) for c in m.tool_calls]
        out.append(msg)
    return out


def _templated_call(call: Any) -> Any:
    """Templates expect an assistant tool call's `function.arguments` as a dict, not JSON text."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        raise APIError(f"messages: tool call arguments are not valid JSON: {fn['arguments'][:80]!r}", 400,
                       "messages") from None
    return {**call, "function": {**fn, "arguments": args}}


def render_chat(tokenizer: Any, messages: list, *, server_template: Optional[str],
                request_template: Optional[str], add_generation_prompt: bool,
                continue_final_message: bool, documents: Optional[list] = None,
                template_kwargs: Optional[dict] = None, add_special_tokens: bool = False,
                tools: Optional[list[dict]] = None) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a conversation; template problems are 400s."""
    template = request_template or server_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(NO_TEMPLATE_MESSAGE, 400, "chat_template")
    conv = conversation(messages)
    if continue_final_message and conv[-1]["role"] != "assistant":
        raise APIError("continue_final_message requires the last message to be from the assistant",
                       400, "continue_final_message")
    kwargs = dict(template_kwargs or {})
    for reserved in ("conversation", "chat_template", "tokenize", "add_generation_prompt",
                     "continue_final_message", "documents", "tools"):
        if reserved in kwargs:
            raise APIError(f"chat_template_kwargs may not set `{reserved}`", 400, "chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(
            conv, chat_template=template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, documents=documents, tools=tools or None,
            tokenize=False, **kwargs)
    except Exception as exc:  # Jinja syntax/runtime errors come from client-supplied templates
        raise APIError(f"Error rendering the chat template: {exc}", 400, "chat_template") from None
    if not isinstance(text, str):
        raise APIError("The chat template did not render to text", 400, "chat_template")
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return text, list(ids)

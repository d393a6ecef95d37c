"""HTTP servers over AsyncLLMEngine: the OpenAI-compatible API (and, later, the Kobold API)."""

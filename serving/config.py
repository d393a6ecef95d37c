"""ServingConfig: the HTTP side's settings, a self-validating dataclass filled from CLI flags or YAML.

The engine's settings live in `aphrodite_jax.config.EngineConfig`; this holds only what the FastAPI
layer needs. Environment variables are read only for the conventional API keys (see serving/cli.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ServingConfig:
    host: Optional[str] = None
    port: int = 2242
    uvicorn_log_level: str = "info"
    served_model_name: list[str] = field(default_factory=list)  # first one is reported; empty -> model path
    chat_template: Optional[str] = None  # a file path or an inline Jinja template
    response_role: str = "assistant"
    max_log_len: int = 0  # 0: log whole prompts (Aphrodite's default); N: at most N chars/ids
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    return_tokens_as_token_ids: bool = False
    api_keys: list[str] = field(default_factory=list)
    admin_key: Optional[str] = None
    max_request_body_bytes: int = 8 * 2**20
    guided_decoding_backend: str = "xgrammar"  # for requests that name none (aphrodite_jax/guided)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs tool_call_parser)
    tool_call_parser: Optional[str] = None  # serving/openai/tool_parsers: hermes, llama3_json
    # Operating surface: CORS, TLS, proxy prefix, user middleware, the Kobold API.
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    ssl_keyfile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_ca_certs: Optional[str] = None
    ssl_cert_reqs: int = 0  # ssl.CERT_NONE; 2 (CERT_REQUIRED) asks clients for a certificate
    root_path: str = ""  # the prefix a reverse proxy strips (ASGI root_path)
    middleware: list[str] = field(default_factory=list)  # import paths: functions or ASGI classes
    launch_kobold_api: bool = True  # the Kobold routes are always mounted (Aphrodite >= 0.6.5)
    # Reliability: shutdown grace period, slow clients, and per-request size limits.
    shutdown_timeout: float = 30.0  # SIGTERM: seconds requests in flight get before they are aborted
    request_read_timeout: float = 30.0  # a request's head and body must arrive within this
    keep_alive_timeout: float = 5.0  # idle keep-alive connections close after this
    max_n: int = 16  # most choices per prompt (`n`, and `best_of`)
    max_tokens_limit: Optional[int] = None  # most `max_tokens`; None: only the context length
    max_stop_strings: int = 64  # SillyTavern sends many custom stopping strings
    max_stop_string_chars: int = 1024
    max_logit_bias: int = 1024  # entries of `logit_bias`
    max_guide_bytes: int = 64 * 2**10  # guided_json/regex/grammar/choice, response_format, tools

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_log_len < 0:
            raise ValueError(f"max_log_len must be >= 0, got {self.max_log_len}")
        if self.uvicorn_log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"unknown uvicorn log level {self.uvicorn_log_level!r}")
        if not self.response_role:
            raise ValueError("response_role must not be empty")
        from aphrodite_jax.guided.params import BACKENDS

        if self.guided_decoding_backend not in BACKENDS:
            raise ValueError(f"unknown guided decoding backend {self.guided_decoding_backend!r}; choose one "
                             f"of {', '.join(BACKENDS)}")
        if self.tool_call_parser is not None:
            from serving.openai.tool_parsers import PARSERS

            if self.tool_call_parser not in PARSERS:
                raise ValueError(f"unknown tool call parser {self.tool_call_parser!r}; choose one of "
                                 f"{', '.join(PARSERS)}")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if any(not k for k in self.api_keys) or self.admin_key == "":
            raise ValueError("API keys and the admin key must not be empty strings")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ValueError(f"ssl_cert_reqs must be 0 (none), 1 (optional) or 2 (required), "
                             f"got {self.ssl_cert_reqs}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"root_path must start with '/' and not end with one, got {self.root_path!r}")
        for name in ("shutdown_timeout", "request_read_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_request_body_bytes", "max_n", "max_stop_strings", "max_stop_string_chars",
                     "max_logit_bias", "max_guide_bytes"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")

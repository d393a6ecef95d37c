"""The server's flags: one table holding every flag of Aphrodite's CLI (docs/decisions.md D32), YAML loading,
and the step from parsed flags to `EngineConfig` + `ServingConfig`.

Why a table: `--help`, the YAML loader and the "not supported yet" guard all read the same list, so a
flag can never be accepted silently and then ignored. A flag whose feature has not landed stays in the
table as UNSUPPORTED: giving it (on the command line or in YAML) is an error that names it.

Every flag defaults to argparse.SUPPRESS, so a parsed namespace holds only what the user gave. That makes
the override order exact (config defaults < YAML < explicit CLI flags) and leaves the defaults in one
place: the config dataclasses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from aphrodite_jax.config import DTYPES, LOAD_FORMATS, QUANTIZATIONS, ConfigError, EngineConfig
from pallas_kernels.backends import backend_names
from serving.config import ServingConfig

SUPPRESS = argparse.SUPPRESS
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class CLIError(Exception):
    """A bad flag or value; `main` prints it as one line and exits with status 2."""


def str2bool(value: str) -> bool:
    low = str(value).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--foo_bar[=x]` -> `--foo-bar[=x]` (Aphrodite's FlexibleArgumentParser); stops at a bare `--`."""
    out: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--":
            out.extend(argv[i:])
            break
        if tok.startswith("--"):
            key, eq, val = tok.partition("=")
            tok = key.replace("_", "-") + eq + val
        out.append(tok)
    return out


class FlexibleArgumentParser(argparse.ArgumentParser):
    """argparse that takes `--foo_bar` like `--foo-bar` and raises CLIError instead of exiting.
    Prefix abbreviations are off: `--max-num` must not silently mean one of two flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(normalize_argv(list(args)), namespace)

    def error(self, message: str):  # argparse calls this for unknown flags and bad values
        raise CLIError(message)

    def actions(self) -> list[argparse.Action]:
        """Every flag and argument of this parser. argparse keeps them in `_actions` without a public
        accessor; this is the one place that reads it (the YAML reader needs each flag's kind)."""
        return list(self._actions)


def json_str_list(value: str) -> list[str]:
    """`--allowed-origins '["https://a"]'` (Aphrodite parses these as JSON); a bare word is one item."""
    try:
        data = json.loads(value)
    except ValueError:
        data = [value]
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return data


class _Unsupported(argparse.Action):
    """Registered so `--help` lists the flag, but using it is an error until its issue lands."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise CLIError(f"not supported yet: {self.option_strings[-1]}")


# ----------------------------------------------------------------------------- the flag table
# (flags, kwargs, help). Where a flag lands is decided by SERVING_KEYS / ENGINE_KEYS below.
_FLAG = "flag"  # a bare switch
_BOOL = "bool"  # an optional true/false value: `--x`, `--x true`, `--x false`

SERVER_FLAGS: list[tuple[tuple[str, ...], Any, str]] = [
    (("--host",), str, "address to bind (default: all interfaces)"),
    (("--port",), int, "port to listen on (default: 2242)"),
    (("--uvicorn-log-level",), {"choices": LOG_LEVELS}, "uvicorn and server log level (default: info)"),
    (("--api-keys",), {"nargs": "+"},
     "API key(s) clients must send; default: env APHRODITE_API_KEY"),
    (("--admin-key",), str, "key for admin routes; default: env APHRODITE_ADMIN_KEY"),
    (("--chat-template",), str, "chat template: a file path or an inline Jinja template"),
    (("--response-role",), str, "role of generated chat messages (default: assistant)"),
    (("--max-log-len",), int, "log at most N prompt characters/ids per request (0: all)"),
    (("--return-tokens-as-token-ids",), _FLAG, "logprob tokens as 'token_id:N' strings"),
    (("--disable-log-requests",), _FLAG, "do not log each request"),
    (("--disable-log-stats",), _FLAG, "do not log throughput/queue statistics"),
    (("--served-model-name",), {"nargs": "+"},
     "model name(s) the API answers to; the first is reported (default: the model path)"),
    (("--guided-decoding-backend",), {"choices": ("xgrammar", "outlines", "lm-format-enforcer")},
     "guided decoding backend for requests that name none (default: xgrammar)"),
    (("--enable-auto-tool-choice",), _FLAG, "allow tool_choice \"auto\" (needs --tool-call-parser)"),
    (("--tool-call-parser",), {"choices": ("hermes", "llama3_json")},
     "how tool calls are parsed from the model's text for tool_choice \"auto\""),
    (("--allowed-origins",), json_str_list, 'CORS allowed origins, JSON list (default: ["*"])'),
    (("--allowed-methods",), json_str_list, 'CORS allowed methods, JSON list (default: ["*"])'),
    (("--allowed-headers",), json_str_list, 'CORS allowed headers, JSON list (default: ["*"])'),
    (("--allow-credentials",), _FLAG, "CORS: allow credentials"),
    (("--ssl-keyfile",), str, "TLS private key file (serve HTTPS)"),
    (("--ssl-certfile",), str, "TLS certificate file"),
    (("--ssl-ca-certs",), str, "CA certificates file for client certificates"),
    (("--ssl-cert-reqs",), int, "client certificate requirement: 0 none, 1 optional, 2 required"),
    (("--root-path",), str, "path prefix when behind a proxy that strips it (ASGI root_path)"),
    (("--middleware",), {"action": "extend", "nargs": "+"},
     "import path of extra middleware (repeatable): a function becomes HTTP middleware, "
     "a class is added as ASGI middleware"),
    (("--launch-kobold-api",), _FLAG, "accepted for compatibility: the Kobold API is always served"),
    (("--shutdown-timeout",), float,
     "on SIGTERM, seconds requests in flight may take to finish before they are aborted (default: 30)"),
    (("--request-read-timeout",), float,
     "close connections that do not send a whole request (head and body) in this many seconds (default: 30)"),
    (("--keep-alive-timeout",), float, "close idle keep-alive connections after this many seconds (default: 5)"),
    (("--max-request-body-bytes",), int, "largest request body; larger ones get a 413 (default: 8 MiB)"),
    (("--max-n",), int, "largest `n` and `best_of` a request may ask for (default: 16)"),
    (("--max-tokens-limit",), int, "largest `max_tokens` a request may ask for (default: the context length)"),
    (("--max-stop-strings",), int, "most stop strings per request (default: 64)"),
    (("--max-stop-string-chars",), int, "longest stop string (default: 1024)"),
    (("--max-logit-bias",), int, "most `logit_bias` entries per request (default: 1024)"),
    (("--max-guide-bytes",), int,
     "largest guide (guided_json/regex/grammar/choice, response_format schema, tools) in bytes (default: 65536)"),
]

ENGINE_FLAGS: list[tuple[tuple[str, ...], Any, str]] = [
    (("--model",), str, "HF folder, .gguf file or cached hub id (default: bundled SmolLM2-135M-Instruct)"),
    (("--tokenizer",), str, "tokenizer folder or hub id (default: the model's)"),
    (("--max-model-len",), int, "context length (default: from the model)"),
    (("--dtype",), {"choices": DTYPES}, "weight/activation dtype (default: auto)"),
    (("--seed",), int, "seed for requests that give none (default: 0)"),
    (("--load-format",), {"choices": LOAD_FORMATS}, "weight format (default: auto)"),
    (("--max-logprobs",), int, "largest logprobs/top_logprobs a request may ask for"),
    (("-tp", "--tensor-parallel-size"), int, "devices on the mesh's 'model' axis (default: 1)"),
    (("--block-size",), {"type": int, "choices": (8, 16, 32)}, "KV page size in tokens (default: 16)"),
    (("--num-gpu-blocks-override",), int, "fixed number of KV pages (ignores the memory budget)"),
    (("-gmu", "--gpu-memory-utilization"), float,
     "fraction of accelerator memory for weights + KV cache (default: 0.9)"),
    (("--kv-cache-memory",), float, "GiB of host memory for the KV cache on CPU (default: 2)"),
    (("--swap-space",), float, "GiB of host memory for swapped-out KV pages (default: 4)"),
    (("--enable-prefix-caching", "--context-shift"), _FLAG, "reuse KV pages of shared prompt prefixes"),
    (("--enable-chunked-prefill",), _BOOL,
     "split long prompts across steps [true|false]; unset: on, with a whole-prompt token budget"),
    (("--max-num-seqs",), int, "most sequences per step (default: 256)"),
    (("--max-num-batched-tokens",), int, "most tokens per step (default: from max-model-len)"),
    (("--preemption-mode",), {"choices": ("recompute", "swap")}, "how to preempt (default: recompute)"),
    (("-q", "--quantization"), {"choices": QUANTIZATIONS},
     "int8: 8-bit block weights for the matmuls (CPU: AVX-512 VNNI kernel built at first use; TPU/GPU: "
     "XLA weight-only int8); default: none"),
    (("--compilation-cache-dir",), str,
     "start-up cache folder: XLA compilations, compiled step executables, parsed GGUF headers "
     "(default: ~/.cache/aphrodite_jax/jax_cache; docs/operating.md)"),
    (("--max-queue-len",), int,
     "most requests waiting for a slot; past it new ones get a 503 with Retry-After (default: no limit)"),
    (("--attention-backend",), {"choices": backend_names()},
     "attention kernel; auto: by platform and model (TPU: tpu; CPU: the C++ kernel where it builds and fits, "
     "else cpu_jax; elsewhere: reference)"),
]

# Aphrodite flags whose features have not landed. The value shape only matters for parsing.
UNSUPPORTED_FLAGS: list[tuple[tuple[str, ...], Any]] = [
    (("--lora-modules",), "+"), (("--prompt-adapters",), "+"),
    (("--disable-frontend-multiprocessing",), 0),
    (("--allow-inline-model-loading",), 0),
    (("--tool-parser-plugin",), None), (("--uvloop",), 0),
    (("--tokenizer-mode",), None), (("--revision",), None), (("--trust-remote-code",), 0),
    (("--download-dir",), None), (("-pp", "--pipeline-parallel-size"), None),
    (("--distributed-executor-backend",), None),
    (("--deepspeed-fp-bits",), None), (("--quant-llm-fp-bits",), None),
    (("--quant-llm-exp-bits",), None), (("--kv-cache-dtype",), None), (("--cpu-offload-gb",), None),
    (("--enforce-eager",), "?"), (("--max-seq-len-to-capture",), None),
    (("--scheduling-policy",), None),
    (("--single-user-mode",), 0), (("--num-scheduler-steps",), None), (("--enable-lora",), 0),
    (("--max-loras",), None), (("--max-lora-rank",), None), (("--max-cpu-loras",), None),
    (("--enable-prompt-adapter",), 0), (("--speculative-model",), None),
    (("--num-speculative-tokens",), None), (("--ngram-prompt-lookup-max",), None),
    (("--ngram-prompt-lookup-min",), None), (("--spec-decoding-acceptance-method",), None),
    (("--rope-scaling",), None), (("--rope-theta",), None), (("--limit-mm-per-prompt",), None),
]

SERVING_KEYS = {"host", "port", "uvicorn_log_level", "api_keys", "admin_key", "chat_template",
                "response_role", "max_log_len", "return_tokens_as_token_ids", "disable_log_requests",
                "disable_log_stats", "served_model_name", "guided_decoding_backend",
                "enable_auto_tool_choice", "tool_call_parser", "allowed_origins", "allowed_methods",
                "allowed_headers", "allow_credentials", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
                "ssl_cert_reqs", "root_path", "middleware", "launch_kobold_api",
                "shutdown_timeout", "request_read_timeout",
                "keep_alive_timeout", "max_request_body_bytes", "max_n", "max_tokens_limit",
                "max_stop_strings", "max_stop_string_chars", "max_logit_bias", "max_guide_bytes"}
ENGINE_KEYS = {"model", "tokenizer", "max_model_len", "dtype", "seed", "load_format", "max_logprobs",
               "tensor_parallel_size", "block_size", "num_gpu_blocks_override", "gpu_memory_utilization",
               "kv_cache_memory", "swap_space", "enable_prefix_caching", "enable_chunked_prefill",
               "max_num_seqs", "max_num_batched_tokens", "preemption_mode",
               "compilation_cache_dir", "max_queue_len", "quantization", "attention_backend"}


def _dest(flags: tuple[str, ...]) -> str:
    return next(f for f in flags if f.startswith("--"))[2:].replace("-", "_")


def add_server_args(parser: argparse.ArgumentParser, *, with_model: bool = True) -> None:
    """Every flag of the table, grouped for --help. `with_model=False` leaves --model to a positional."""
    parser.add_argument("--config", default=SUPPRESS, metavar="FILE.yaml",
                        help="YAML file of flags (flat keys or Aphrodite's sections); "
                             "flags given on the command line override it")
    for title, table in (("server", SERVER_FLAGS), ("engine", ENGINE_FLAGS)):
        group = parser.add_argument_group(f"{title} options")
        for flags, spec, help_ in table:
            if flags == ("--model",) and not with_model:
                continue
            kw: dict[str, Any] = {"dest": _dest(flags), "default": SUPPRESS, "help": help_}
            if spec == _FLAG:
                kw.update(action="store_const", const=True)
            elif spec == _BOOL:
                kw.update(nargs="?", const=True, type=str2bool, metavar="BOOL")
            elif isinstance(spec, dict):
                kw.update(spec)
            else:
                kw["type"] = spec
            group.add_argument(*flags, **kw)
    group = parser.add_argument_group("not supported yet (exit with an error when given)")
    for flags, nargs in UNSUPPORTED_FLAGS:
        group.add_argument(*flags, dest=_dest(flags), action=_Unsupported, nargs=nargs,
                           default=SUPPRESS, help="not supported yet")


def build_flat_parser(prog: str = "python -m serving.openai") -> FlexibleArgumentParser:
    """The parser of `python -m serving.openai` (and of YAML files): flags only, --model optional."""
    parser = FlexibleArgumentParser(prog=prog, usage="%(prog)s [--model MODEL] [options]",
                                    description="OpenAI-compatible server on aphrodite-jax.")
    add_server_args(parser)
    return parser


# ----------------------------------------------------------------------------- YAML
def _yaml_items(data: Any, path: str) -> dict[str, Any]:
    """Flat keys, or Aphrodite's sections (`basic_args: [{model: x}, ...]`), merged in file order."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of flag names to values")
    known = _known_dests()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known and isinstance(value, list) and all(
                isinstance(x, dict) and len(x) == 1 for x in value):
            for item in value:  # a section: a list of single-key maps
                (k, v), = item.items()
                out[str(k).replace("-", "_")] = v
        else:
            out[name] = value
    return out


def _known_dests() -> dict[str, argparse.Action]:
    parser = build_flat_parser()
    return {a.dest: a for a in parser.actions() if a.option_strings and a.dest not in ("help", "config")}


def yaml_to_argv(path: str) -> list[str]:
    """Read a YAML config into flag tokens, following Aphrodite's `aphrodite yaml` rules: null, empty
    and false values are skipped, except for true/false flags, which get an explicit value."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise CLIError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CLIError(f"invalid YAML in {path}: {str(exc).splitlines()[0]}") from None
    known = _known_dests()
    argv: list[str] = []
    for key, value in _yaml_items(data, path).items():
        if key not in known:
            raise CLIError(f"{path}: unknown option {key!r}")
        action = known[key]
        flag = action.option_strings[-1]
        if action.nargs == "?" and not isinstance(action, _Unsupported):  # true/false flag
            if value is not None:
                argv += [flag, str(value).lower()]
        elif value is None or value == "" or value is False:
            continue
        elif action.nargs == 0:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag] + [_yaml_scalar(v) for v in value]
        else:
            argv += [flag, _yaml_scalar(value)]
    return argv


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, dict):
        if len(value) == 1:  # lora_modules style `{name: path}` -> name=path
            (k, v), = value.items()
            return f"{k}={v}"
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# ----------------------------------------------------------------------------- configs
def resolve_args(cli: dict[str, Any]) -> dict[str, Any]:
    """Merge a parsed command line with its --config file: YAML first, explicit flags over it."""
    cli = dict(cli)
    path = cli.pop("config", None)
    if path is None:
        return cli
    yaml_ns = build_flat_parser().parse_args(yaml_to_argv(path))
    merged = vars(yaml_ns)
    merged.pop("config", None)
    merged.update(cli)
    return merged


def build_configs(args: dict[str, Any], environ: Optional[dict] = None
                  ) -> tuple[EngineConfig, ServingConfig]:
    """Flat flag values -> (EngineConfig, ServingConfig); validation errors become CLIError."""
    environ = os.environ if environ is None else environ
    unknown = set(args) - SERVING_KEYS - ENGINE_KEYS
    if unknown:
        raise CLIError(f"unknown option(s): {', '.join(sorted(unknown))}")
    serving = {k: v for k, v in args.items() if k in SERVING_KEYS}
    engine = {k: v for k, v in args.items() if k in ENGINE_KEYS}
    # The conventional key variables fill in only what the command line left out.
    if "api_keys" not in serving and environ.get("APHRODITE_API_KEY"):
        # One or more keys, separated by commas or whitespace.
        serving["api_keys"] = environ["APHRODITE_API_KEY"].replace(",", " ").split()
    if "admin_key" not in serving and environ.get("APHRODITE_ADMIN_KEY"):
        serving["admin_key"] = environ["APHRODITE_ADMIN_KEY"]
    try:
        return EngineConfig.from_kwargs(**engine), ServingConfig(**serving)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None

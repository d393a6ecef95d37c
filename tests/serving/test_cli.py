"""The server CLI: every Aphrodite flag is known, implemented ones land in the right config field,
the rest refuse by name, YAML (flat and sectioned) is overridden by explicit flags, and bad values fail
with one clear line. Parse-level tests load no model; one slow test starts the real server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.args import UNSUPPORTED_FLAGS, CLIError, build_flat_parser
from serving.cli import build_cli_parser, main, main_flat, parse_cli, parse_flat

REPO = Path(__file__).resolve().parents[2]

# Aphrodite's flag set (docs/decisions.md D32), written out here on purpose: the flag table must not lose any of them.
SPEC_FLAGS = """
--host --port --uvicorn-log-level --allow-credentials --allowed-origins --allowed-methods
--allowed-headers --api-keys --admin-key --lora-modules --prompt-adapters --chat-template
--response-role --ssl-keyfile --ssl-certfile --ssl-ca-certs --ssl-cert-reqs --root-path --middleware
--launch-kobold-api --max-log-len --return-tokens-as-token-ids --disable-frontend-multiprocessing
--allow-inline-model-loading --enable-auto-tool-choice --tool-call-parser --tool-parser-plugin
--disable-log-requests --disable-log-stats --uvloop
--model --served-model-name --tokenizer --tokenizer-mode --revision --trust-remote-code --download-dir
--max-model-len -tp --tensor-parallel-size -pp --pipeline-parallel-size --distributed-executor-backend
-q --quantization --deepspeed-fp-bits --quant-llm-fp-bits --quant-llm-exp-bits --load-format --dtype
--kv-cache-dtype --block-size -gmu --gpu-memory-utilization --swap-space --cpu-offload-gb
--enable-prefix-caching --context-shift --enable-chunked-prefill --max-num-seqs
--max-num-batched-tokens --enforce-eager --max-seq-len-to-capture --max-logprobs
--guided-decoding-backend --scheduling-policy --single-user-mode --num-scheduler-steps --enable-lora
--max-loras --max-lora-rank --max-cpu-loras --enable-prompt-adapter --speculative-model
--num-speculative-tokens --ngram-prompt-lookup-max --ngram-prompt-lookup-min
--spec-decoding-acceptance-method --rope-scaling --rope-theta --limit-mm-per-prompt --seed
""".split()
OURS = ["--config", "--kv-cache-memory", "--num-gpu-blocks-override", "--preemption-mode"]


def _field(configs, path: str):
    engine, serving = configs
    obj = serving if path.startswith("serving.") else engine
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _help_words(parser) -> set[str]:
    return set(parser.format_help().replace(",", " ").replace("[", " ").replace("]", " ").split())


def test_help_lists_every_flag():
    for parser in (build_flat_parser(), build_cli_parser()._subparsers._group_actions[0].choices["run"]):
        words = _help_words(parser)
        missing = [f for f in SPEC_FLAGS + OURS if f not in words]
        assert not missing, missing


def test_help_exits_zero_without_loading_jax():
    out = subprocess.run([sys.executable, "-m", "serving.openai", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--max-model-len" in out.stdout and "--speculative-model" in out.stdout
    probe = "import sys, serving.cli; serving.cli.parse_flat(['--port', '1']); print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() == "False"


@pytest.mark.parametrize("argv, path, expected", [
    (["--host", "127.0.0.1"], "serving.host", "127.0.0.1"),
    (["--port", "8001"], "serving.port", 8001),
    (["--served-model-name", "a", "b"], "serving.served_model_name", ["a", "b"]),
    (["--tokenizer", "/tmp/tok"], "engine.model.tokenizer", "/tmp/tok"),
    (["--max-model-len", "2048"], "engine.model.max_model_len", 2048),
    (["--dtype", "bfloat16"], "engine.model.dtype", "bfloat16"),
    (["--seed", "7"], "engine.model.seed", 7),
    (["--chat-template", "{{ messages }}"], "serving.chat_template", "{{ messages }}"),
    (["--response-role", "bot"], "serving.response_role", "bot"),
    (["--max-log-len", "100"], "serving.max_log_len", 100),
    (["--disable-log-requests"], "serving.disable_log_requests", True),
    (["--disable-log-stats"], "serving.disable_log_stats", True),
    (["--uvicorn-log-level", "warning"], "serving.uvicorn_log_level", "warning"),
    (["--max-num-seqs", "32"], "engine.scheduler.max_num_seqs", 32),
    (["--max-num-batched-tokens", "4096"], "engine.scheduler.max_num_batched_tokens", 4096),
    (["--block-size", "32"], "engine.cache.block_size", 32),
    (["--enable-prefix-caching"], "engine.cache.enable_prefix_caching", True),
    (["--context-shift"], "engine.cache.enable_prefix_caching", True),
    (["--enable-chunked-prefill"], "engine.scheduler.enable_chunked_prefill", True),
    (["--enable-chunked-prefill", "false"], "engine.scheduler.enable_chunked_prefill", False),
    (["--enable-chunked-prefill=true"], "engine.scheduler.enable_chunked_prefill", True),
    (["--num-gpu-blocks-override", "2048"], "engine.cache.num_gpu_blocks_override", 2048),
    (["--tensor-parallel-size", "4"], "engine.parallel.tensor_parallel_size", 4),
    (["-tp", "2"], "engine.parallel.tensor_parallel_size", 2),
    (["--load-format", "dummy"], "engine.model.load_format", "dummy"),
    (["--max-logprobs", "5"], "engine.max_logprobs", 5),
    (["--return-tokens-as-token-ids"], "serving.return_tokens_as_token_ids", True),
    (["--kv-cache-memory", "1.5"], "engine.cache.kv_cache_memory", 1.5),
    (["--gpu-memory-utilization", "0.5"], "engine.cache.gpu_memory_utilization", 0.5),
    (["-gmu", "0.6"], "engine.cache.gpu_memory_utilization", 0.6),
    (["--swap-space", "8"], "engine.cache.swap_space", 8.0),
    (["--preemption-mode", "swap"], "engine.scheduler.preemption_mode", "swap"),
    (["--compilation-cache-dir", "/tmp/cc"], "engine.compilation_cache_dir", "/tmp/cc"),
    (["--quantization", "int8"], "engine.model.quantization", "int8"),
    (["-q", "int8"], "engine.model.quantization", "int8"),
    (["--model", "/models/x.gguf"], "engine.model.model", "/models/x.gguf"),
    (["--api-keys", "k1"], "serving.api_keys", ["k1"]),
    (["--admin-key", "adm"], "serving.admin_key", "adm"),
    (["--guided-decoding-backend", "outlines"], "serving.guided_decoding_backend", "outlines"),
    (["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], "serving.enable_auto_tool_choice", True),
    (["--tool-call-parser", "llama3_json"], "serving.tool_call_parser", "llama3_json"),
])
def test_flag_maps_to_field(argv, path, expected):
    assert _field(parse_flat(argv), path) == expected
    underscored = [_underscore(a) for a in argv]
    assert _field(parse_flat(underscored), path) == expected


def test_defaults_come_from_the_dataclasses():
    engine, serving = parse_flat([])
    assert serving.port == 2242 and serving.host is None and serving.served_model_name == []
    assert engine.model.model is None and engine.scheduler.max_num_seqs == 256
    assert engine.cache.enable_prefix_caching is False


def _underscore(arg: str) -> str:
    """`--foo-bar=x` -> `--foo_bar=x`: the spelling Aphrodite also accepts."""
    if not arg.startswith("--"):
        return arg
    key, eq, val = arg[2:].partition("=")
    return "--" + key.replace("-", "_") + eq + val


def _value_for(nargs):
    return [] if nargs == 0 else ["x"]


@pytest.mark.parametrize("flags, nargs", UNSUPPORTED_FLAGS, ids=lambda v: str(v))
def test_unsupported_flag_refuses_by_name(flags, nargs):
    for flag in flags:
        with pytest.raises(CLIError, match=f"^not supported yet: {flags[-1]}$"):
            parse_flat([flag] + _value_for(nargs))
    if flags[-1].startswith("--"):
        with pytest.raises(CLIError, match="not supported yet"):
            parse_flat([_underscore(flags[-1])] + _value_for(nargs))


def test_unsupported_flag_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main_flat(["--port", "1234", "--speculative-model", "[ngram]"])
    assert exc.value.code == 2
    assert "not supported yet: --speculative-model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "some/model", "--trust-remote-code"])
    assert exc.value.code == 2
    assert "not supported yet: --trust-remote-code" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--port", "abc"], "invalid int value"),
    (["--port", "70000"], "port must be in 1..65535"),
    (["--dtype", "int4"], "invalid choice"),
    (["--block-size", "12"], "invalid choice"),
    (["--max-model-len", "-1"], "max_model_len must be positive"),
    (["--max-num-seqs", "0"], "max_num_seqs must be positive"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--enable-chunked-prefill", "maybe"], "expected true or false"),
    (["--uvicorn-log-level", "loud"], "invalid choice"),
    (["--max-log-len", "-3"], "max_log_len must be >= 0"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--tool-call-parser", "mistral"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--max-num", "4"], "unrecognized arguments"),  # no prefix abbreviations
])
def test_bad_values_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main_flat(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


FLAT_YAML = """
served_model_name: [y1, y2]
port: 3000
max_model_len: 1024
max_num_seqs: 8
enable_prefix_caching: true
enable_chunked_prefill: false
enforce_eager: false      # false/null values are skipped, even for flags not supported yet
quantization: null
"""

SECTIONED_YAML = """
basic_args:
  - model: /models/m.gguf
  - max_model_len: 4096
  - tensor_parallel_size: 2
api_args:
  - port: 3001
  - served_model_name: s1
  - disable_log_requests: true
advanced_args:
  - enable_chunked_prefill: true
  - swap_space: 2
seed: 5
"""


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_yaml_flat_keys(tmp_path):
    engine, serving = parse_flat(["--config", _write(tmp_path, FLAT_YAML)])
    assert serving.served_model_name == ["y1", "y2"] and serving.port == 3000
    assert engine.model.max_model_len == 1024 and engine.scheduler.max_num_seqs == 8
    assert engine.cache.enable_prefix_caching is True
    assert engine.scheduler.enable_chunked_prefill is False


def test_yaml_sectioned_format(tmp_path):
    engine, serving = parse_cli(["yaml", _write(tmp_path, SECTIONED_YAML)])
    assert engine.model.model == "/models/m.gguf" and engine.model.max_model_len == 4096
    assert engine.parallel.tensor_parallel_size == 2 and engine.model.seed == 5
    assert engine.scheduler.enable_chunked_prefill is True and engine.cache.swap_space == 2.0
    assert serving.port == 3001 and serving.served_model_name == ["s1"]
    assert serving.disable_log_requests is True


def test_cli_flags_override_yaml(tmp_path):
    path = _write(tmp_path, SECTIONED_YAML)
    engine, serving = parse_cli(["run", "/other.gguf", "--config", path, "--port", "4000",
                                 "--max_model_len", "512"])
    assert engine.model.model == "/other.gguf"  # the positional model beats the file's
    assert serving.port == 4000 and engine.model.max_model_len == 512
    assert engine.parallel.tensor_parallel_size == 2  # untouched keys come from the file
    engine, serving = parse_cli(["yaml", path, "--served-model-name", "x"])
    assert serving.served_model_name == ["x"] and serving.port == 3001
    engine, _ = parse_flat(["--max-model-len", "256", "--config", _write(tmp_path, FLAT_YAML)])
    assert engine.model.max_model_len == 256  # order on the command line does not matter


@pytest.mark.parametrize("text, message", [
    ("kv_cache_dtype: fp8\n", "not supported yet: --kv-cache-dtype"),
    ("quantization: awq\n", "quantization.*invalid choice: 'awq'"),
    ("basic_args:\n  - speculative_model: '[ngram]'\n", "not supported yet: --speculative-model"),
    ("no_such_key: 1\n", "unknown option 'no_such_key'"),
    ("port: [1, 2]\n", "unrecognized arguments"),
    ("max_model_len: -5\n", "max_model_len must be positive"),
    ("port: 2242\n  bad: indent\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_yaml(tmp_path, text, message):
    with pytest.raises(CLIError, match=message):
        parse_flat(["--config", _write(tmp_path, text)])


def test_missing_config_file(tmp_path):
    with pytest.raises(CLIError, match="cannot read config file"):
        parse_flat(["--config", str(tmp_path / "nope.yaml")])


def test_run_subcommand_and_model_positional():
    engine, _ = parse_cli(["run", "my/model", "--max-num-seqs", "4"])
    assert engine.model.model == "my/model" and engine.scheduler.max_num_seqs == 4
    engine, _ = parse_cli(["run"])
    assert engine.model.model is None  # the bundled default
    with pytest.raises(CLIError, match="a command is required"):
        parse_cli([])


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("APHRODITE_API_KEY", "env-key")
    monkeypatch.setenv("APHRODITE_ADMIN_KEY", "env-admin")
    _, serving = parse_flat([])
    assert serving.api_keys == ["env-key"] and serving.admin_key == "env-admin"
    _, serving = parse_flat(["--api-keys", "cli-key", "--admin-key", "cli-admin"])
    assert serving.api_keys == ["cli-key"] and serving.admin_key == "cli-admin"


def test_shipped_configs_parse():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        parse_cli(["yaml", str(path)])


# ----------------------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_serves_the_names_it_was_given(tmp_path):
    try:
        import serving.openai.api_server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"serving.openai.api_server is not importable yet: {exc}")
    import httpx

    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.openai", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "a", "b", "--max-model-len", "2048", "--max-num-seqs", "32",
         "--num-gpu-blocks-override", "2048", "--disable-log-stats"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a cold compile cache takes about a minute
        while True:
            assert proc.poll() is None, f"server exited early:\n{_read(log)}"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server never became healthy:\n{_read(log)}"
            time.sleep(1)
        ids = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]]
        assert "a" in ids and "b" in ids, ids
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = _read(log)
    assert f"on http://127.0.0.1:{port}" in text and "as a, b on" in text, text
    assert "shutting down the engine" in text, text
    log.close()


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()[-5000:]


def test_stats_logger_line_only_after_work():
    """What --disable-log-stats turns off: a line per interval while steps ran, nothing when idle."""
    from types import SimpleNamespace

    from aphrodite_jax.config import CacheConfig, SchedulerConfig
    from aphrodite_jax.engine.llm_engine import EngineStats
    from aphrodite_jax.engine.scheduler import Scheduler
    from aphrodite_jax.engine.snapshot import EngineSnapshot
    from serving.stats_logger import StatsLogger

    engine = SimpleNamespace(stats=EngineStats(),
                             scheduler=Scheduler(SchedulerConfig(), CacheConfig(), 64, 16, 2048))
    stats = StatsLogger(SimpleNamespace(snapshot=lambda: EngineSnapshot.capture(engine.stats, engine.scheduler)))
    assert stats.line() is None
    engine.stats.steps, engine.stats.prompt_tokens, engine.stats.generation_tokens = 3, 40, 2
    text = stats.line()
    assert "Avg prompt throughput" in text and "Running: 0 reqs" in text
    assert "GPU KV cache usage: 0.0%" in text
    assert stats.line() is None

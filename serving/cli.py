"""Entry points: `aphrodite-jax run [MODEL] [flags]`, `aphrodite-jax yaml CONFIG.yaml [flags]` and
`python -m serving.openai [--model M] [flags]`, mirroring Aphrodite's `aphrodite run | yaml`.

Parsing (serving/args.py) never imports JAX, so `--help` and flag errors answer at once; the engine
and uvicorn are imported only by `run_server`.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Any, Optional, Sequence

from aphrodite_jax.config import EngineConfig
from serving.args import (SUPPRESS, CLIError, FlexibleArgumentParser, add_server_args,
                          build_configs, build_flat_parser, resolve_args)
from serving.config import ServingConfig
from serving.stats_logger import StatsLogger

__all__ = ["main", "main_flat", "parse_cli", "parse_flat", "run_server", "build_cli_parser",
           "CLIError", "served_name"]

logger = logging.getLogger("aphrodite_jax.serving")


def build_cli_parser() -> FlexibleArgumentParser:
    """`aphrodite-jax {run,yaml}`: the console script's parser."""
    parser = FlexibleArgumentParser(prog="aphrodite-jax",
                                    description="aphrodite-jax: an Aphrodite-compatible LLM server on JAX.")
    sub = parser.add_subparsers(dest="command", metavar="{run,yaml}")
    run = sub.add_parser("run", usage="%(prog)s [MODEL] [options]", help="serve a model over the OpenAI-compatible API",
                         description="Serve MODEL (default: the bundled SmolLM2-135M-Instruct).")
    run.add_argument("model_tag", nargs="?", default=SUPPRESS, metavar="MODEL",
                     help="model to serve (same as --model)")
    add_server_args(run)
    yml = sub.add_parser("yaml", usage="%(prog)s CONFIG.yaml [options]",
                         help="serve with the flags from a YAML config file",
                         description="Serve with the flags of CONFIG.yaml; extra flags override it.")
    yml.add_argument("yaml_path", metavar="CONFIG.yaml")
    add_server_args(yml)
    return parser


def _finish(ns_dict: dict[str, Any]) -> tuple[EngineConfig, ServingConfig]:
    return build_configs(resolve_args(ns_dict))


def parse_cli(argv: Optional[Sequence[str]] = None) -> tuple[EngineConfig, ServingConfig]:
    """Console-script arguments -> configs. Raises CLIError on any bad flag or value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_cli_parser()
    ns = vars(parser.parse_args(argv))
    command = ns.pop("command", None)
    if command is None:
        raise CLIError("a command is required: run or yaml (see aphrodite-jax --help)")
    if command == "run" and "model_tag" in ns:
        ns["model"] = ns.pop("model_tag")
    if command == "yaml":
        path = ns.pop("yaml_path")
        if "config" in ns:
            raise CLIError("give the YAML file once: `aphrodite-jax yaml FILE` takes no --config")
        ns["config"] = path
    return _finish(ns)


def parse_flat(argv: Optional[Sequence[str]] = None) -> tuple[EngineConfig, ServingConfig]:
    """`python -m serving.openai` arguments -> configs. Raises CLIError on any bad flag or value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return _finish(vars(build_flat_parser().parse_args(argv)))


def served_name(engine_config: EngineConfig, serving_config: ServingConfig) -> str:
    """The model being loaded, for logs: its path or hub id, else the bundled default's file."""
    if engine_config.model.model:
        return engine_config.model.model
    from aphrodite_jax.loaders.resolve import DEFAULT_MODEL_FILE

    return f"the bundled default ({DEFAULT_MODEL_FILE})"


def uvicorn_ssl_kwargs(config: ServingConfig) -> dict[str, Any]:
    """The TLS settings uvicorn takes (empty without --ssl-keyfile/--ssl-certfile)."""
    if not config.ssl_certfile:
        return {}
    return dict(ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
                ssl_ca_certs=config.ssl_ca_certs, ssl_cert_reqs=config.ssl_cert_reqs)


def _setup_logging(level: str) -> None:
    py_level = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=py_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(py_level)
    logging.getLogger("jax").setLevel(max(py_level, logging.WARNING))


EXIT_ENGINE_DEAD = 1  # the engine died: a supervisor should restart the server


def uvicorn_config(app: Any, serving_config: ServingConfig, host: Optional[str] = None):
    """uvicorn's settings for the server: graceful-shutdown grace period, keep-alive and the
    request-head timeout that drops slow-loris clients (serving/http_protocol.py)."""
    import uvicorn

    from serving.http_protocol import timed_h11_protocol

    return uvicorn.Config(app, host=host or serving_config.host or "0.0.0.0", port=serving_config.port,
                          log_level=serving_config.uvicorn_log_level,
                          timeout_graceful_shutdown=max(1, round(serving_config.shutdown_timeout)),
                          timeout_keep_alive=serving_config.keep_alive_timeout,
                          http=timed_h11_protocol(serving_config.request_read_timeout),
                          **uvicorn_ssl_kwargs(serving_config))


def run_server(engine_config: EngineConfig, serving_config: ServingConfig) -> int:
    """Build the engine and the app, serve until SIGINT/SIGTERM or the engine's death, then shut the
    engine down. Returns the exit status: 0 after SIGTERM (requests in flight got up to
    --shutdown-timeout to finish, then were aborted), EXIT_ENGINE_DEAD when the engine died."""
    _setup_logging(serving_config.uvicorn_log_level)
    import uvicorn

    from serving.openai.api_server import build_app  # fail before the slow model load

    from aphrodite_jax.engine.async_engine import AsyncLLMEngine
    from aphrodite_jax.engine.llm_engine import LLMEngine

    host = serving_config.host or "0.0.0.0"  # Aphrodite binds every interface when --host is absent
    logger.info("loading model %s", served_name(engine_config, serving_config))
    engine = AsyncLLMEngine(LLMEngine(engine_config))
    stats = None if serving_config.disable_log_stats else StatsLogger(engine).start()
    stopped = False
    status = 0

    def stop_engine() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            logger.info("shutting down the engine")
            if stats is not None:
                stats.stop()
            engine.shutdown()

    try:
        app = build_app(engine, serving_config)
        names = list(getattr(app.state, "served_model_names", None) or serving_config.served_model_name)

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                if self.started:
                    logger.info("serving model %s as %s on %s://%s:%d%s (OpenAI API under /v1, Kobold "
                                "under /api, playground at /)", served_name(engine_config, serving_config),
                                ", ".join(names) or "?", "https" if serving_config.ssl_certfile else "http",
                                host, serving_config.port, serving_config.root_path)

            def handle_exit(self, sig, frame) -> None:
                if not self.should_exit:
                    logger.info("%s: no new requests; waiting up to %ss for those in flight",
                                signal.Signals(sig).name, serving_config.shutdown_timeout)
                app.state.draining = True  # /health answers 503 from now on
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises a caught signal once serving ends. A SIGTERM'd server has shut
                # down cleanly by then and exits 0; Ctrl-C still ends as KeyboardInterrupt (130).
                # The engine stops first, inside that window.
                with super().capture_signals():
                    try:
                        yield
                    finally:
                        stop_engine()
                        self._captured_signals = [s for s in self._captured_signals
                                                  if s != signal.SIGTERM]

        server = _Server(uvicorn_config(app, serving_config, host))

        def on_dead(exc: BaseException) -> None:
            nonlocal status
            status = EXIT_ENGINE_DEAD
            logger.critical("exiting with status %d so a supervisor restarts the server: %s",
                            EXIT_ENGINE_DEAD, exc)
            server.should_exit = True

        getattr(engine, "on_dead", []).append(on_dead)
        server.run()
    finally:
        stop_engine()
    return status


def _exit_on_error(fn, argv, prog: str) -> tuple[EngineConfig, ServingConfig]:
    try:
        return fn(argv)
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _serve(configs: tuple[EngineConfig, ServingConfig]) -> None:
    try:
        status = run_server(*configs)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a graceful shutdown
        sys.exit(130)
    if status:
        sys.exit(status)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The `aphrodite-jax` console script."""
    _serve(_exit_on_error(parse_cli, argv, "aphrodite-jax"))


def main_flat(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m serving.openai`."""
    _serve(_exit_on_error(parse_flat, argv, "python -m serving.openai"))


if __name__ == "__main__":
    main()

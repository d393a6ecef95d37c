"""The OpenAI-compatible HTTP API: `build_app(engine, serving_config)` in api_server.py."""

"""The auth matrix (no key, wrong key, API key, admin key; as Bearer and as
x-api-key) against an OpenAI route, a Kobold route, an admin route, /health and /metrics, on the real
server over the shared engine; plus admin-only and no-key configurations, CORS and the env keys."""
from __future__ import annotations

import httpx
import openai
import pytest

from serving.args import build_configs
from serving.auth import AuthMiddleware, is_admin_path
from serving.config import ServingConfig

pytestmark = pytest.mark.slow

API, ADMIN = "sk-api-123", "sk-admin-456"
ROUTES = {  # name: (method, path, json body)
    "openai": ("GET", "/v1/models", None),
    "openai_post": ("POST", "/v1/tokenize", {"model": "{model}", "prompt": "hi"}),
    "kobold": ("POST", "/api/extra/tokencount", {"prompt": "hi"}),
    "kobold_get": ("GET", "/api/v1/model", None),
    "admin": ("GET", "/v1/admin/status", None),
    "health": ("GET", "/health", None),
    "metrics": ("GET", "/metrics", None),
}
# Expected status per (key, route) with both an API key and an admin key configured.
EXPECTED = {
    "none": {"openai": 401, "openai_post": 401, "kobold": 401, "kobold_get": 401, "admin": 401,
             "health": 200, "metrics": 200},
    "wrong": {"openai": 401, "openai_post": 401, "kobold": 401, "kobold_get": 401, "admin": 401,
              "health": 200, "metrics": 200},
    "api": {"openai": 200, "openai_post": 200, "kobold": 200, "kobold_get": 200, "admin": 401,
            "health": 200, "metrics": 200},
    "admin": {"openai": 200, "openai_post": 200, "kobold": 200, "kobold_get": 200, "admin": 200,
              "health": 200, "metrics": 200},
}
KEYS = {"none": None, "wrong": "sk-wrong", "api": API, "admin": ADMIN}


@pytest.fixture(scope="module")
def secured(default_llm):
    from server_utils import start_server

    cfg = ServingConfig(api_keys=["sk-other", API], admin_key=ADMIN,
                        allowed_origins=["http://allowed.example"], allow_credentials=True)
    handle = start_server(default_llm.engine, cfg)
    yield handle
    handle.stop()


def _call(client, route, headers, model):
    method, path, body = ROUTES[route]
    if body is not None:
        body = {k: (v.format(model=model) if isinstance(v, str) else v) for k, v in body.items()}
    return client.request(method, path, json=body, headers=headers)


def test_auth_matrix(secured):
    model = secured.app.state.served_model_names[0]
    wrong_cells = []
    with httpx.Client(base_url=secured.base_url, timeout=60) as c:
        for key_name, key in KEYS.items():
            forms = [{}] if key is None else [{"Authorization": f"Bearer {key}"}, {"x-api-key": key}]
            for headers in forms:
                for route, want in EXPECTED[key_name].items():
                    r = _call(c, route, headers, model)
                    if r.status_code != want:
                        wrong_cells.append(f"{key_name} {list(headers) or '-'} {route}: {r.status_code} != {want}")
                    if want == 401 and r.status_code == 401:
                        err = r.json()["error"]  # OpenAI's error shape
                        assert err["code"] == 401 and err["type"] == "AuthenticationError" and err["message"]
                        assert r.headers["www-authenticate"] == "Bearer"
    assert not wrong_cells, "\n".join(wrong_cells)


def test_openai_client_with_keys(secured):
    model = secured.app.state.served_model_names[0]
    with openai.OpenAI(base_url=secured.v1, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=model, prompt="Hi", max_tokens=2)
    with openai.OpenAI(base_url=secured.v1, api_key=API, max_retries=0) as good:
        r = good.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1


def test_admin_status_lists_config_without_secrets(secured):
    r = httpx.get(secured.base_url + "/v1/admin/status", headers={"x-api-key": ADMIN})
    data = r.json()
    assert set(data) >= {"requests", "num_requests", "kv_cache", "engine_config", "serving_config"}
    assert 0.0 <= data["kv_cache"]["gpu_usage"] <= 1.0
    assert data["kv_cache"]["num_gpu_blocks"] == secured.total_blocks()
    assert API not in r.text and ADMIN not in r.text and data["serving_config"]["admin_key"] == "***"


def test_cors_preflight_and_headers(secured):
    with httpx.Client(base_url=secured.base_url) as c:
        pre = c.options("/v1/models", headers={"Origin": "http://allowed.example",
                                               "Access-Control-Request-Method": "GET",
                                               "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200  # no key needed for a preflight
        assert pre.headers["access-control-allow-origin"] == "http://allowed.example"
        assert pre.headers["access-control-allow-credentials"] == "true"
        other = c.options("/v1/models", headers={"Origin": "http://evil.example",
                                                 "Access-Control-Request-Method": "GET"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        # A 401 still carries the CORS header, so a browser page can read the error.
        r = c.get("/v1/models", headers={"Origin": "http://allowed.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://allowed.example"


def test_rules_without_keys_and_with_admin_key_only():
    open_ = AuthMiddleware(None, [], None)
    assert open_.check("/v1/models", None) is None and open_.check("/api/v1/generate", None) is None
    assert open_.check("/v1/admin/status", None)[0] == 403  # admin disabled without an admin key
    admin_only = AuthMiddleware(None, [], ADMIN)
    assert admin_only.check("/v1/models", None)[0] == 401  # any key set: /v1 and /api need one
    assert admin_only.check("/v1/models", ADMIN) is None
    assert admin_only.check("/v1/admin/status", ADMIN) is None
    assert admin_only.check("/health", None) is None and admin_only.check("/", None) is None
    assert not is_admin_path("/v1/models") and is_admin_path("/v1/model/load")
    assert is_admin_path("/v1/lora/load") and is_admin_path("/v1/admin/status")


def test_keys_from_environment():
    _, s = build_configs({}, environ={"APHRODITE_API_KEY": "k1, k2 k3", "APHRODITE_ADMIN_KEY": "adm"})
    assert s.api_keys == ["k1", "k2", "k3"] and s.admin_key == "adm"
    _, s = build_configs({"api_keys": ["cli"]}, environ={"APHRODITE_API_KEY": "env"})
    assert s.api_keys == ["cli"]


def test_cors_and_kobold_flags_parse():
    from serving.args import CLIError
    from serving.cli import parse_flat

    _, s = parse_flat(["--allowed-origins", '["http://a.example", "http://b.example"]', "--allowed-methods",
                       '["GET", "POST"]', "--allowed-headers", "x-api-key", "--allow-credentials",
                       "--launch-kobold-api"])
    assert s.allowed_origins == ["http://a.example", "http://b.example"] and s.allowed_methods == ["GET", "POST"]
    assert s.allowed_headers == ["x-api-key"] and s.allow_credentials and s.launch_kobold_api
    with pytest.raises(CLIError, match="JSON list of strings"):
        parse_flat(["--allowed-origins", '{"a": 1}'])

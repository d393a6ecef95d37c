"""HTTPS with a self-signed certificate made here with `cryptography` (the openai
client trusts that CA and nothing else), and `--root-path` / `--middleware` shown on the real server."""
from __future__ import annotations

import datetime
import ipaddress
import ssl
import textwrap

import httpx
import openai
import pytest

from serving.cli import parse_flat

pytestmark = pytest.mark.slow


def make_self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aphrodite-jax test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_with_self_signed_certificate(default_llm, tmp_path):
    from server_utils import start_server

    key_path, cert_path = make_self_signed(tmp_path)
    _, cfg = parse_flat(["--ssl-keyfile", str(key_path), "--ssl-certfile", str(cert_path)])
    handle = start_server(default_llm.engine, cfg)
    try:
        assert handle.base_url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert_path))
        client = openai.OpenAI(base_url=handle.v1, api_key="x", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=ctx))
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        client.close()  # an idle keep-alive connection would hold the server's graceful shutdown
        # Without that CA the handshake fails: the server really speaks TLS with this certificate.
        with openai.OpenAI(base_url=handle.v1, api_key="x", max_retries=0) as untrusting:
            with pytest.raises(openai.APIConnectionError):
                untrusting.models.list()
        # Plain HTTP on that port gets no HTTP answer.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError, httpx.ReadTimeout)):
            httpx.get(handle.base_url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        handle.stop()


MIDDLEWARE = textwrap.dedent('''
    async def tag_response(request, call_next):
        response = await call_next(request)
        response.headers["x-func-middleware"] = request.url.path
        return response


    class TagASGI:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def tagged(message):
                if message["type"] == "http.response.start":
                    message["headers"] = list(message.get("headers", [])) + [(b"x-class-middleware", b"yes")]
                await send(message)
            await self.app(scope, receive, tagged)
''')


def test_root_path_and_middleware(default_llm, tmp_path, monkeypatch):
    from server_utils import start_server

    (tmp_path / "my_mw.py").write_text(MIDDLEWARE)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, cfg = parse_flat(["--root-path", "/llm", "--middleware", "my_mw.tag_response",
                         "--middleware", "my_mw.TagASGI"])
    assert cfg.root_path == "/llm" and cfg.middleware == ["my_mw.tag_response", "my_mw.TagASGI"]
    handle = start_server(default_llm.engine, cfg)
    try:
        with httpx.Client(base_url=handle.base_url, timeout=60) as c:
            # Behind a proxy that strips /llm, requests arrive without it; links must carry it.
            spec = c.get("/openapi.json").json()
            assert spec["servers"] == [{"url": "/llm"}]
            direct = c.get("/v1/models")
            prefixed = c.get("/llm/v1/models")  # a proxy that keeps the prefix works too
            assert direct.status_code == prefixed.status_code == 200
            assert direct.json()["data"][0]["id"] == prefixed.json()["data"][0]["id"]
            assert c.get("/llm/").status_code == 200 and "playground" in c.get("/llm/").text
            # Both middleware kinds ran on every response.
            for r in (direct, prefixed, c.get("/health")):
                assert r.headers["x-class-middleware"] == "yes"
                assert r.headers["x-func-middleware"] in ("/v1/models", "/llm/v1/models", "/health")
        client = openai.OpenAI(base_url=handle.base_url + "/llm/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        raw = client.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=2)
        assert raw.headers["x-class-middleware"] == "yes" and raw.parse().usage.completion_tokens >= 1
        client.close()
    finally:
        handle.stop()


def test_bad_middleware_and_tls_flags_fail_clearly(tmp_path):
    from serving.args import CLIError
    from serving.middleware import import_middleware

    with pytest.raises(ValueError, match="cannot import"):
        import_middleware("no_such_module_xyz.thing")
    with pytest.raises(ValueError, match="has no attribute"):
        import_middleware("json.no_such_thing")
    with pytest.raises(CLIError, match="both --ssl-keyfile and --ssl-certfile"):
        parse_flat(["--ssl-certfile", str(tmp_path / "c.pem")])
    with pytest.raises(CLIError, match="root_path"):
        parse_flat(["--root-path", "llm/"])

"""CORS: off by default (no CORS headers at all); with --allowed-origins a browser's preflight is
answered before the API-key check, and only the allowed origins get the allow-origin header.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from app.config import resolve
from tests.app.conftest import API_KEY, start_server
from tests.app.fake_engine import FakeEngine

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_off_by_default(fake_server) -> None:
    r = httpx.options(fake_server.api_url + "/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.get(fake_server.api_url + "/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_preflight_and_allowed_origin(tiny_tokenizer_dir: Path) -> None:
    live = start_server(
        FakeEngine(tiny_tokenizer_dir, max_model_len=128),
        api_key=[API_KEY],
        allowed_origins=[ORIGIN],
        allowed_methods=["GET", "POST"],
        allow_credentials=True,
    )
    try:
        r = httpx.options(live.api_url + "/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200  # no API key needed for the preflight
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["access-control-allow-credentials"] == "true"
        assert set(r.headers["access-control-allow-methods"].replace(" ", "").split(",")) == {"GET", "POST"}
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        auth = {"Authorization": f"Bearer {API_KEY}"}
        r = httpx.get(live.api_url + "/models", headers={"Origin": ORIGIN, **auth})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = httpx.get(live.api_url + "/models", headers={"Origin": "https://evil.example", **auth})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = httpx.options(live.api_url + "/models", headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        live.stop()


def test_cors_settings_from_env_and_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("allowed_origins: [https://a.example]\nallow_credentials: true\n")
    env = {"WEIR_ALLOWED_METHODS": "GET,POST", "WEIR_ALLOWED_HEADERS": "authorization"}
    _, server = resolve({"config": str(cfg)}, env=env)
    assert server.allowed_origins == ["https://a.example"] and server.allow_credentials is True
    assert server.allowed_methods == ["GET", "POST"] and server.allowed_headers == ["authorization"]
    _, server = resolve({"allowed_origins": ["https://b.example", "https://c.example"]}, env={})
    assert server.allowed_origins == ["https://b.example", "https://c.example"]
    assert server.allowed_methods == ["*"] and server.allow_credentials is False

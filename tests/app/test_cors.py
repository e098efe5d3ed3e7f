"""CORS: off by default (no CORS headers at all); with --allowed-origins a browser's preflight is
answered before the API-key check, and only the allowed origins get the allow-origin header.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.cli import main
from app.config import ConfigError, resolve
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


@pytest.mark.parametrize(
    ("flags", "env", "yaml_text", "source"),
    [
        ({"allow_credentials": True}, {}, "", "--allow-credentials"),
        ({}, {"WEIR_ALLOW_CREDENTIALS": "true"}, "", "WEIR_ALLOW_CREDENTIALS"),
        ({}, {}, "allow_credentials: true\n", "key 'allow_credentials' in"),
    ],
)
def test_cors_settings_without_allowed_origins_are_refused(
    tmp_path: Path, flags: dict, env: dict, yaml_text: str, source: str
) -> None:
    """--allow-credentials (and methods or headers) without --allowed-origins were silently ignored:
    CORS stays off without origins."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        resolve({**flags, "config": str(cfg)}, env=env)
    assert str(exc.value).startswith(f"allow_credentials (from {source}")
    assert str(exc.value).endswith(
        ") needs allowed_origins (--allowed-origins, WEIR_ALLOWED_ORIGINS or allowed_origins in YAML); "
        "without it CORS is off and no CORS header is sent"
    )


def test_cors_methods_without_origins_are_refused_and_defaults_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(
        ConfigError, match=r"^allowed_methods \(from WEIR_ALLOWED_METHODS\) needs allowed_origins"
    ):
        resolve({}, env={"WEIR_ALLOWED_METHODS": "GET"})
    with pytest.raises(
        ConfigError, match=r"^allowed_headers \(from --allowed-headers\) needs allowed_origins"
    ):
        resolve({"allowed_headers": ["authorization"]}, env={})
    # The defaults spelled out (config/default.yaml does) are no request for CORS.
    _, server = resolve({"allow_credentials": False, "allowed_methods": ["*"]}, env={})
    assert server.allowed_origins == [] and server.allow_credentials is False
    assert main(["serve", "--allow-credentials"]) == 2
    assert capsys.readouterr().err.startswith(
        "weir serve: error: allow_credentials (from --allow-credentials) needs allowed_origins"
    )

"""Multi-LoRA through the HTTP layer, on the fake engine (its adapters change its tokens): the request's
model selects the adapter, /v1/models lists adapters under their parent, adapters load and unload at
run time with vLLM's bodies, each refusal has its exact status and body, and the metrics follow.
The real engine's side (outputs equal to the offline LLM's) is tests/app/test_lora_server.py.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app.server import build_app
from tests.app.conftest import API_KEY, MODEL_NAME, LiveServer, start_server, wait_until
from tests.app.fake_engine import FakeEngine


@pytest.fixture()
def adapter_dirs(tmp_path: Path) -> dict[str, str]:
    dirs = {}
    for name in ("sql", "chat", "extra"):
        (tmp_path / name).mkdir()
        dirs[name] = str(tmp_path / name)
    return dirs


@pytest.fixture()
def lora_server(tiny_tokenizer_dir: Path, adapter_dirs: dict[str, str]) -> Iterator[LiveServer]:
    engine = FakeEngine(tiny_tokenizer_dir, max_model_len=128, max_loras=2)
    live = start_server(
        engine,
        lora_modules=[f"sql={adapter_dirs['sql']}", f"chat={adapter_dirs['chat']}"],
        lora_shares=["chat=3"],
        allow_runtime_lora_updating=True,
    )
    yield live
    live.stop()


def _complete(client: httpx.Client, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 6, "seed": 3, **extra}
    return client.post("/v1/completions", json=body)


def _error(status: int, message: str, param: str | None, code: str) -> tuple[int, dict]:
    return status, {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def test_model_name_selects_the_adapter(lora_server: LiveServer) -> None:
    oai = openai.OpenAI(base_url=lora_server.api_url, api_key="unused")
    texts = {}
    for model in (MODEL_NAME, "sql", "chat"):
        r = oai.completions.create(model=model, prompt="hello", max_tokens=6, seed=3)
        assert r.model == model
        texts[model] = r.choices[0].text
        again = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, seed=3
        )
        assert again.model == model
    assert len(set(texts.values())) == 3  # three "models": the fake's tokens depend on the adapter
    assert (
        oai.completions.create(model="sql", prompt="hello", max_tokens=6, seed=3).choices[0].text
        == texts["sql"]
    )


def test_models_lists_adapters_with_their_parent(
    lora_server: LiveServer, adapter_dirs: dict[str, str]
) -> None:
    oai = openai.OpenAI(base_url=lora_server.api_url, api_key="unused")
    cards = {m.id: m.model_dump() for m in oai.models.list().data}
    assert list(cards) == [MODEL_NAME, "sql", "chat"]
    assert cards[MODEL_NAME]["parent"] is None
    for name in ("sql", "chat"):
        assert cards[name]["parent"] == MODEL_NAME and cards[name]["root"] == adapter_dirs[name]
        assert cards[name]["object"] == "model" and cards[name]["max_model_len"] == 128


def test_unknown_model_is_404_listing_what_is_served(lora_server: LiveServer) -> None:
    with httpx.Client(base_url=lora_server.base_url) as c:
        r = _complete(c, "sqll")
        assert (r.status_code, r.json()) == _error(
            404,
            f"The model `sqll` does not exist. This server serves: {MODEL_NAME}, sql, chat.",
            "model",
            "model_not_found",
        )
        assert _complete(c, "sql").status_code == 200  # still serving


def test_load_and_unload_at_run_time(lora_server: LiveServer, adapter_dirs: dict[str, str]) -> None:
    engine: FakeEngine = lora_server.engine
    with httpx.Client(base_url=lora_server.base_url) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": adapter_dirs["extra"]})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'extra' added successfully.")
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL_NAME, "sql", "chat", "extra"]
        assert _complete(c, "extra").status_code == 200
        extra_id = lora_server.state.loras.get("extra").lora_int_id  # type: ignore[union-attr]
        assert extra_id == 3 and engine.loras[extra_id].lora_name == "extra"

        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'extra' removed successfully.")
        assert extra_id not in engine.loras
        r = _complete(c, "extra")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        # Loaded again under the same name: a new id, so nothing of the old one is reused; with a share
        # for --scheduling-policy fair this time.
        body = {"lora_name": "extra", "lora_path": adapter_dirs["extra"], "fair_share": 2.5}
        r = c.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200 and lora_server.state.loras.get("extra").lora_int_id == 4  # type: ignore[union-attr]
        assert (
            engine.loras[4].fair_share == 2.5 and engine.loras[2].fair_share == 3.0
        )  # chat (id 2): --lora-shares
        assert lora_server.state.loras.get("sql").fair_share == 1.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/load_lora_adapter",
            {"lora_name": "sql", "lora_path": "/x"},
            _error(
                400,
                "The lora adapter 'sql' has already been loaded; unload it first to replace it.",
                "lora_name",
                "adapter_already_loaded",
            ),
        ),
        (
            "/v1/load_lora_adapter",
            {"lora_name": MODEL_NAME, "lora_path": "/x"},
            _error(
                400,
                f"The name '{MODEL_NAME}' is the base model's served name; choose another lora_name.",
                "lora_name",
                "name_in_use",
            ),
        ),
        (
            "/v1/load_lora_adapter",
            {"lora_name": "new", "lora_path": "/nonexistent/adapter"},
            _error(
                400,
                "LoRA adapter 'new': lora_path: '/nonexistent/adapter' is not a directory",
                "lora_path",
                "invalid_value",
            ),
        ),
        (
            "/v1/load_lora_adapter",
            {"lora_path": "/x"},
            _error(
                400,
                "Invalid request: Object missing required field `lora_name` (at `lora_name`)",
                "lora_name",
                "invalid_type",
            ),
        ),
        (
            "/v1/load_lora_adapter",
            {"lora_name": "new", "lora_path": " "},
            _error(400, "lora_path must be a non-empty string.", "lora_path", "invalid_value"),
        ),
        (
            "/v1/load_lora_adapter",
            {"lora_name": "new", "lora_path": "/x", "fair_share": 0},
            _error(
                400,
                "fair_share of adapter 'new' must be a number in (0, 1e6]; got 0.0",
                "fair_share",
                "invalid_value",
            ),
        ),
        (
            "/v1/unload_lora_adapter",
            {"lora_name": "nope"},
            _error(404, "The lora adapter 'nope' cannot be found.", "lora_name", "adapter_not_found"),
        ),
        (
            "/v1/unload_lora_adapter",
            {"lora_name": 5},
            _error(
                400,
                "Invalid request: Expected `str`, got `int` (at `lora_name`)",
                "lora_name",
                "invalid_type",
            ),
        ),
    ],
)
def test_bad_load_and_unload_requests(
    lora_server: LiveServer, path: str, body: dict, expected: tuple
) -> None:
    with httpx.Client(base_url=lora_server.base_url) as c:
        r = c.post(path, json=body)
        assert (r.status_code, r.json()) == expected
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL_NAME, "sql", "chat"]
        assert _complete(c, "sql").status_code == 200  # the server keeps serving


def test_runtime_updating_is_off_by_default_and_behind_the_api_key(
    tiny_tokenizer_dir: Path, adapter_dirs: dict[str, str]
) -> None:
    body = {"lora_name": "extra", "lora_path": adapter_dirs["extra"]}
    live = start_server(
        FakeEngine(tiny_tokenizer_dir, max_loras=2), lora_modules=[f"sql={adapter_dirs['sql']}"]
    )
    try:
        with httpx.Client(base_url=live.base_url) as c:
            for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                r = c.post(path, json=body)
                assert (r.status_code, r.json()) == _error(
                    404,
                    "Loading and unloading LoRA adapters at run time is off on this server; start it with "
                    "--allow-runtime-lora-updating (and --enable-lora) to turn it on.",
                    None,
                    "not_found",
                )
            assert _complete(c, "sql").status_code == 200
    finally:
        live.stop()
    live = start_server(
        FakeEngine(tiny_tokenizer_dir, max_loras=2), allow_runtime_lora_updating=True, api_key=[API_KEY]
    )
    try:
        with httpx.Client(base_url=live.base_url) as c:
            r = c.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "extra" not in live.state.loras
            r = c.post("/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 200 and "extra" in live.state.loras
    finally:
        live.stop()


def test_in_flight_request_finishes_after_unload(lora_server: LiveServer) -> None:
    engine: FakeEngine = lora_server.engine
    with httpx.Client(base_url=lora_server.base_url, timeout=30) as c:
        engine.pause()
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.setdefault("r", _complete(c, "sql")))
        t.start()
        assert wait_until(lambda: engine.stats().num_waiting == 1)
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        assert _complete(c, "sql").status_code == 404
        engine.resume()
        t.join(30)
    r = result["r"]
    assert r.status_code == 200 and r.json()["model"] == "sql"
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_lora_metrics(lora_server: LiveServer) -> None:
    engine: FakeEngine = lora_server.engine
    with httpx.Client(base_url=lora_server.base_url, timeout=30) as c:
        for model in ("sql", "sql", "chat", MODEL_NAME):
            assert _complete(c, model).status_code == 200
        text = c.get("/metrics").text
        assert f'weir:lora_requests_total{{lora_name="sql",model_name="{MODEL_NAME}"}} 2.0' in text
        assert f'weir:lora_requests_total{{lora_name="chat",model_name="{MODEL_NAME}"}} 1.0' in text
        assert f'weir:lora_generation_tokens_total{{lora_name="sql",model_name="{MODEL_NAME}"}} 12.0' in text
        assert (
            'weir:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in text
        )

        engine.pause()
        t = threading.Thread(target=lambda: _complete(c, "chat"))
        t.start()
        assert wait_until(lambda: engine.stats().num_waiting == 1)
        text = c.get("/metrics").text
        assert (
            'weir:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters="chat"}'
            in text
        )
        engine.resume()
        t.join(30)

        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        text = c.get("/metrics").text
        assert (
            'lora_name="sql"' not in text
            and f'weir:lora_requests_total{{lora_name="chat",model_name="{MODEL_NAME}"}} 2.0' in text
        )


def test_a_bad_startup_adapter_stops_the_server(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from app.config import ServerConfig
    from app.runner import make_server

    cfg = ServerConfig(
        host="127.0.0.1", port=0, served_model_name=[MODEL_NAME], lora_modules=[f"bad={tmp_path / 'missing'}"]
    )
    app = build_app(FakeEngine(tiny_tokenizer_dir, max_loras=1), cfg)
    server = make_server(app, cfg)
    server.run()  # returns at once: the server stops before serving
    assert not server.started_event.is_set() and server.port is None
    assert app.state.weir.startup_error == (
        f"lora_modules: LoRA adapter 'bad': lora_path: '{tmp_path / 'missing'}' is not a directory"
    )


def test_weir_serve_exits_1_with_the_adapter_error_as_its_last_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_tokenizer_dir: Path,
    tmp_path: Path,
) -> None:
    """`weir serve` in-process, over the fake engine: the refusal of a --lora-modules adapter stops it."""
    import app.logging
    import app.runner
    import engine.async_engine
    from app.cli import main

    class RefusingEngine(FakeEngine):
        async def add_lora(self, lora_request: object) -> bool:
            raise ValueError(
                "LoRA adapter 'big': r: rank 32 is above max_lora_rank 16 (raise --max-lora-rank)"
            )

    monkeypatch.setattr(
        engine.async_engine, "AsyncEngine", lambda cfg, **kw: RefusingEngine(tiny_tokenizer_dir, max_loras=1)
    )
    monkeypatch.setattr(app.logging, "configure_logging", lambda *a: None)  # the test's own logging stays
    monkeypatch.setattr(app.runner, "set_switch_interval", lambda s: None)
    code = main(
        [
            "serve",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--enable-lora",
            "--lora-modules",
            f"big={tmp_path}",
        ]
    )
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "weir serve: error: lora_modules: LoRA adapter 'big': r: rank 32 is above max_lora_rank 16 "
        "(raise --max-lora-rank)"
    )
    assert gc.isenabled()  # start-up turns the collector off; a failed one gives it back

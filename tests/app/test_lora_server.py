"""Multi-LoRA through the real server and engine, with the OpenAI SDK, deployed from a YAML file with a
`lora:` section: the request's model selects the adapter (outputs equal the offline LLM's with that
LoRARequest), /v1/models, loading and unloading while serving (a request in flight on an unloaded
adapter finishes with it), and bad adapters refused with their exact status and body while the
server keeps serving. Adapters are built and saved by peft over the tiny Llama.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from app.config import resolve
from engine import LLM, LoRARequest, SamplingParams
from tests.app.conftest import LiveServer, start_server
from tests.tiny_models import hf_causal_lm

MAX_TOKENS = 8
PROMPTS = [[5, 17, 33, 9, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
# name -> (rank, target modules)
ADAPTERS = {
    "sql": (4, ["q_proj", "v_proj"]),
    "chat": (8, ["o_proj", "gate_proj", "down_proj"]),
    "extra": (2, ["k_proj", "up_proj"]),
}
LORA_IDS = {name: i for i, name in enumerate(ADAPTERS, start=1)}  # in the offline LLM


def _save_adapter(
    base_dir: Path, out: Path, rank: int, targets: list[str], seed: int, **config: object
) -> str:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        hf_causal_lm(str(base_dir), dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, **config),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft starts B at zero: an adapter that changes nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    paths = {
        name: _save_adapter(tiny_llama_dir, root / name, rank, targets, seed=i)
        for i, (name, (rank, targets)) in enumerate(ADAPTERS.items())
    }
    paths["rank32"] = _save_adapter(tiny_llama_dir, root / "rank32", 32, ["q_proj"], seed=9)
    return paths


@pytest.fixture(scope="module")
def offline(tiny_llama_dir: Path) -> Iterator[LLM]:
    llm = LLM(
        str(tiny_llama_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=3, max_model_len=128
    )
    yield llm
    llm.shutdown()


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(offline: LLM, adapters: dict[str, str]) -> dict[tuple[str | None, int], str]:
    """(adapter, prompt index) -> the offline LLM's greedy text with that LoRARequest."""
    out: dict[tuple[str | None, int], str] = {}
    for name in [None, *ADAPTERS]:
        lora = None if name is None else LoRARequest(name, LORA_IDS[name], adapters[name])
        for p, o in enumerate(offline.generate(PROMPTS, _greedy(), use_tqdm=False, lora_request=lora)):
            out[(name, p)] = o.outputs[0].text
    assert len(set(out.values())) == len(out)  # every adapter changes the output
    return out


@pytest.fixture(scope="module")
def lora_live(
    tiny_llama_dir: Path, adapters: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The server as `weir serve --config deploy.yaml` would build it (config/multi-lora.yaml's shape)."""
    from engine.async_engine import AsyncEngine

    deploy = tmp_path_factory.mktemp("deploy") / "deploy.yaml"
    deploy.write_text(
        f"model: {tiny_llama_dir}\n"
        "served_model_name: base\n"
        "device: cpu\ndtype: float32\nmax_model_len: 128\n"
        "scheduling_policy: fair\n"
        "lora:\n"
        "  enable: true\n  max_loras: 2\n  max_lora_rank: 16\n  allow_runtime_updating: true\n"
        "  adapters:\n"
        f"    - {{name: sql, path: {adapters['sql']}}}\n"
        f"    - {{name: chat, path: {adapters['chat']}}}\n"
    )
    engine_config, server_config = resolve({"config": str(deploy)}, env={})
    live = start_server(
        AsyncEngine(engine_config),
        served_model_name=server_config.served_model_name,
        lora_modules=server_config.lora_modules,
        allow_runtime_lora_updating=server_config.allow_runtime_lora_updating,
    )
    yield live
    live.stop()


def _sdk(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.api_url, api_key="unused", max_retries=0)


def _complete(client: openai.OpenAI, model: str, p: int) -> str:
    r = client.completions.create(
        model=model, prompt=PROMPTS[p], max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.model == model
    return r.choices[0].text


def test_model_name_selects_the_adapter(lora_live: LiveServer, expected: dict) -> None:
    client = _sdk(lora_live)
    for p in range(len(PROMPTS)):
        assert _complete(client, "base", p) == expected[(None, p)]
        for name in ("sql", "chat"):
            assert _complete(client, name, p) == expected[(name, p)], (name, p)


def test_models_lists_the_adapters(lora_live: LiveServer, adapters: dict[str, str]) -> None:
    cards = [m.model_dump() for m in _sdk(lora_live).models.list().data]
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("sql", "base"), ("chat", "base")]
    assert cards[1]["root"] == adapters["sql"]


def test_load_use_and_unload_while_serving(
    lora_live: LiveServer, adapters: dict[str, str], expected: dict
) -> None:
    client = _sdk(lora_live)
    with httpx.Client(base_url=lora_live.base_url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": adapters["extra"]})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'extra' added successfully.")
        assert _complete(client, "extra", 1) == expected[("extra", 1)]
        # Three adapters and the base model in flight at once, over max_loras=2 slots.
        results: dict[tuple[str, int], str] = {}
        threads = [
            threading.Thread(target=lambda m=m, p=p: results.__setitem__((m, p), _complete(client, m, p)))
            for m in ("base", "sql", "chat", "extra")
            for p in range(len(PROMPTS))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert (
            results == {(m, p): expected[(None if m == "base" else m, p)] for m, p in results}
            and len(results) == 8
        )

        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'extra' removed successfully.")
        with pytest.raises(openai.NotFoundError) as exc:
            _complete(client, "extra", 0)
        assert exc.value.body == {
            "message": "The model `extra` does not exist. This server serves: base, sql, chat.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }


def test_request_in_flight_on_an_unloaded_adapter_finishes(
    lora_live: LiveServer, adapters: dict[str, str], offline: LLM
) -> None:
    body = {"model": "brief", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text, finish = [], None
    with httpx.Client(base_url=lora_live.base_url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "brief", "lora_path": adapters["extra"]})
        assert r.status_code == 200
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            for line in lines:  # the first token: the request is running on the adapter
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    break
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "brief"}).status_code == 200
            assert c.post("/v1/completions", json=body).status_code == 404
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])["choices"][0]
                    text.append(chunk["text"])
                    finish = chunk["finish_reason"] or finish
    assert finish == "length"
    lora = LoRARequest("extra", LORA_IDS["extra"], adapters["extra"])  # as the offline LLM knows it
    want = offline.generate([PROMPTS[0]], _greedy(24), use_tqdm=False, lora_request=lora)
    assert "".join(text) == want[0].outputs[0].text


@pytest.fixture(scope="module")
def bad_adapters(adapters: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Adapters weir must refuse, made from a good one: name -> directory."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad-loras")
    good = Path(adapters["sql"])
    config = json.loads((good / "adapter_config.json").read_text())
    weights = load_file(str(good / "adapter_model.safetensors"))

    def make(name: str, changes: dict, tensors: dict | None = None, pickled: bool = False) -> None:
        d = root / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        if pickled:
            (d / "adapter_model.bin").write_bytes(b"never unpickled")
        else:
            save_file(tensors or weights, str(d / "adapter_model.safetensors"))

    make("dora", {"use_dora": True})
    make("saves-head", {"modules_to_save": ["lm_head"]})
    make("embeddings", {"target_modules": ["embed_tokens"]})
    make("pickled", {}, pickled=True)
    a = weights[SHAPE_KEY]  # [rank, hidden]
    make("shape", {}, {**weights, SHAPE_KEY: torch.zeros(a.shape[0], a.shape[1] + 1)})
    make("truncated", {})  # a copy cut short: safetensors' own error was a 500
    truncated = root / "truncated" / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    return {d.name: str(d) for d in root.iterdir()} | {
        "rank32": adapters["rank32"],
        "missing": str(root / "missing"),
    }


SHAPE_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _bad_loads(bad: dict[str, str], hidden: int) -> list[tuple[str, str]]:
    """(adapter, the start of the engine's message for it)"""
    return [
        ("rank32", "LoRA adapter 'rank32': r: rank 32 is above max_lora_rank 16 (raise --max-lora-rank)"),
        ("dora", "LoRA adapter 'dora': use_dora: DoRA adapters are not supported"),
        (
            "saves-head",
            "LoRA adapter 'saves-head': modules_to_save: ['lm_head'] would replace whole base-model modules "
            "per adapter; not supported",
        ),
        ("embeddings", "LoRA adapter 'embeddings': target_modules: 'embed_tokens' is not supported"),
        (
            "pickled",
            "LoRA adapter 'pickled': adapter_model.bin: pickled weights are never loaded (unpickling runs code); "
            "convert them to adapter_model.safetensors",
        ),
        (
            "shape",
            f"LoRA adapter 'shape': {SHAPE_KEY}: shape (4, {hidden + 1}) does not match the base model's (4, {hidden})",
        ),
        ("missing", f"LoRA adapter 'missing': lora_path: {bad['missing']!r} is not a directory"),
        (
            "truncated",
            "LoRA adapter 'truncated': adapter_model.safetensors: unreadable: Error while deserializing "
            "header: invalid header length",
        ),
    ]


def test_bad_adapters_are_refused_and_the_server_keeps_serving(
    lora_live: LiveServer, bad_adapters: dict[str, str], expected: dict, tiny_llama_dir: Path
) -> None:
    hidden = json.loads((tiny_llama_dir / "config.json").read_text())["hidden_size"]
    client = _sdk(lora_live)
    with httpx.Client(base_url=lora_live.base_url, timeout=60) as c:
        for name, message in _bad_loads(bad_adapters, hidden):
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": bad_adapters[name]})
            error = r.json()["error"]
            assert (r.status_code, error["type"], error["param"], error["code"]) == (
                400,
                "invalid_request_error",
                "lora_path",
                "invalid_value",
            ), name
            assert error["message"].startswith(message), (name, error["message"])
        assert [m.id for m in client.models.list().data] == ["base", "sql", "chat"]
        assert _complete(client, "sql", 0) == expected[("sql", 0)]


def test_lora_metrics_from_the_engine(lora_live: LiveServer) -> None:
    client = _sdk(lora_live)
    before = httpx.get(lora_live.base_url + "/metrics").text
    _complete(client, "chat", 0)
    text = httpx.get(lora_live.base_url + "/metrics").text
    line = 'weir:lora_requests_total{lora_name="chat",model_name="base"} '
    counted_before = float(before.split(line)[1].split()[0]) if line in before else 0.0
    assert float(text.split(line)[1].split()[0]) == counted_before + 1
    assert 'weir:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in text

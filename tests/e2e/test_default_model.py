"""The embedded default model: small enough to ship, a Llama checkpoint, and it answers in English."""

from __future__ import annotations

import json
from pathlib import Path

import engine
from app.config import default_model_dir
from engine import LLM, SamplingParams

MODEL_DIR = Path(engine.__file__).parent / "default_model"


def test_default_model_is_a_small_llama_checkpoint() -> None:
    assert Path(default_model_dir()) == MODEL_DIR
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    weights = sum(p.stat().st_size for p in MODEL_DIR.glob("*.safetensors"))
    assert 0 < weights <= 8 * 1000 * 1000
    assert (MODEL_DIR / "tokenizer.json").is_file()
    assert (
        "chat_template" in (MODEL_DIR / "tokenizer_config.json").read_text()
        or (MODEL_DIR / "chat_template.jinja").is_file()
    )


def test_default_model_chats_in_english() -> None:
    llm = LLM(str(MODEL_DIR), device="cpu")
    (out,) = llm.chat(
        [{"role": "user", "content": "What does json.dumps do?"}],
        SamplingParams(temperature=0.0, max_tokens=60),
        use_tqdm=False,
    )
    reply = out.outputs[0]
    words = reply.text.split()
    assert len(words) >= 3
    # Readable English: mostly ASCII letters, and it ends its turn with the chat stop token.
    letters = sum(c.isascii() and c.isalpha() for c in reply.text)
    assert letters / max(1, len(reply.text.replace(" ", ""))) > 0.8
    assert reply.finish_reason == "stop"

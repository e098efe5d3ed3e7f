"""PEFT adapters with random weights for the tests' tiny models, and PEFT's own greedy tokens with one: the
reference every "adapter matches PEFT" test compares weir with."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_models import hf_causal_lm


def random_peft_adapter(
    model_dir: Path,
    out: Path,
    target_modules: list[str],
    r: int = 4,
    lora_alpha: int = 8,
    seed: int = 5,
    std: float = 0.15,
) -> Path:
    """A LoRA adapter on `target_modules` of the model, its A and B drawn at random (B too: a fresh
    adapter's zero B would change nothing), saved under `out` as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        hf_causal_lm(str(model_dir), dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(str(out))
    return out


def peft_greedy(
    model_dir: Path, adapter_dir: Path, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """PEFT's greedy continuation of each prompt with the adapter (no EOS stop), token ids."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(
        hf_causal_lm(str(model_dir), dtype=torch.float32), str(adapter_dir)
    ).eval()
    return [
        peft.generate(
            torch.tensor([p]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        for p in prompts
    ]


def assert_engine_matches_peft(
    model_dir: Path, adapter_dir: Path, prompts: list[list[int]], max_tokens: int = 20
) -> None:
    """weir's greedy tokens with the adapter equal PEFT's, and differ from weir's without it (so the adapter
    is seen to change the output)."""
    from engine import LLM, LoRARequest, SamplingParams

    expected = peft_greedy(model_dir, adapter_dir, prompts, max_new_tokens=max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8)
    base = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in base] != expected  # the adapter changes the output
    request = LoRARequest("adapter", 1, str(adapter_dir))
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=[request] * len(prompts))
    assert [o.outputs[0].token_ids for o in outs] == expected

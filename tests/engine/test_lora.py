"""Multi-LoRA against transformers + PEFT: four adapters of different ranks and targets, built and
saved by peft over the tiny Llama, mixed with the base model in one batch; weir's greedy tokens equal
PEFT's for every request, under chunked prefill, preemption, prefix caching (one prompt under two
adapters: each adapter's own output), slot pressure (max_loras=2 with four adapters in flight) and
emulated CUDA graphs (the per-token slot index as a static input)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.errors import InvalidRequestError, LoRAAdapterError
from tests.peft_adapters import peft_greedy, random_peft_adapter
from tests.tiny_models import hf_causal_lm

MAX_TOKENS = 8
# name -> (rank, lora_alpha, target_modules, use_rslora)
ADAPTERS: dict[str, tuple[int, int, list[str] | str, bool]] = {
    "r4-qv": (4, 8, ["q_proj", "v_proj"], False),
    "r8-all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "r16-regex": (16, 32, r".*\.(o_proj|gate_proj|down_proj)", False),
    "r2-kup": (2, 4, ["k_proj", "up_proj"], False),
}


def save_peft_adapters(model_dir: Path, root: Path) -> dict[str, LoRARequest]:
    """ADAPTERS over the checkpoint in `model_dir`, saved by peft under `root` with random non-zero B
    (so each changes the output); also used by loadtest/gpu_feature_check.py."""
    from peft import LoraConfig, get_peft_model

    requests: dict[str, LoRARequest] = {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        base = hf_causal_lm(str(model_dir), dtype=torch.float32)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0
        )
        model = get_peft_model(base, config)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        model.save_pretrained(str(root / name))
        requests[name] = LoRARequest(name, i + 1, str(root / name))
    return requests


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def lora_setup(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The adapters (saved by peft, random non-zero B) and a function giving PEFT's greedy tokens."""
    from peft import PeftModel

    requests = save_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("loras"))

    cache: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}
    models: dict[str | None, torch.nn.Module] = {}

    def model(adapter: str | None) -> torch.nn.Module:
        if adapter not in models:
            base = hf_causal_lm(str(tiny_llama_dir), dtype=torch.float32)
            models[adapter] = (
                base if adapter is None else PeftModel.from_pretrained(base, requests[adapter].lora_path)
            ).eval()
        return models[adapter]

    def expected(prompt: list[int], adapter: str | None) -> list[int]:
        key = (adapter, tuple(prompt))
        if key not in cache:
            out = model(adapter).generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return {"model": str(tiny_llama_dir), "requests": requests, "expected": expected, "peft_model": model}


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _check(llm: LLM, setup: dict, prompts: list[list[int]], adapters: list[str | None]) -> None:
    loras = [setup["requests"][a] if a else None for a in adapters]
    outs = llm.generate(prompts, _greedy(), use_tqdm=False, lora_request=loras)
    got = [o.outputs[0].token_ids for o in outs]
    want = [setup["expected"](p, a) for p, a in zip(prompts, adapters, strict=True)]
    assert got == want
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0


# One prompt set for every test, so PEFT's outputs are computed once per (prompt, adapter).
PROMPTS = _prompts(0, (5, 17, 33, 9, 12, 17, 21, 6))
MIXED = [None, "r4-qv", "r8-all", "r16-regex", "r2-kup", "r8-all", None, "r4-qv"]


def test_mixed_batch_matches_peft(lora_setup: dict) -> None:
    prompts = PROMPTS
    llm = LLM(lora_setup["model"], device="cpu", dtype="float32", enable_lora=True, max_loras=4)
    # every adapter changes the output: the test would catch LoRA not being applied
    outs = {a: lora_setup["expected"](prompts[2], a) for a in (None, *ADAPTERS)}
    assert len({tuple(v) for v in outs.values()}) == len(outs)
    _check(llm, lora_setup, prompts, MIXED)
    assert [r.lora_name for r in llm.llm_engine.lora_requests()] == ["r4-qv", "r8-all", "r16-regex", "r2-kup"]

    # beam search: every beam runs with the adapter (transformers + PEFT's generate(num_beams=2)),
    # ranked on the device after its first step
    from engine.beam_search import BeamSearchParams

    sched = llm.llm_engine.scheduler
    start, started = sched.start_device_group, []
    sched.start_device_group = lambda *args: started.append(start(*args)) or started[-1]
    (out,) = llm.beam_search(
        [PROMPTS[1]], BeamSearchParams(2, MAX_TOKENS), lora_request=lora_setup["requests"]["r8-all"]
    )
    hf = lora_setup["peft_model"]("r8-all").generate(
        torch.tensor([PROMPTS[1]]), num_beams=2, num_return_sequences=2, do_sample=False,
        max_new_tokens=MAX_TOKENS, pad_token_id=0,
    )  # fmt: skip
    want = []
    for seq in hf.tolist():
        gen = seq[len(PROMPTS[1]) :]
        want.append(gen[: gen.index(2) + 1] if 2 in gen else gen)  # EOS (2) ends a beam
    assert [s.tokens[len(PROMPTS[1]) :] for s in out.sequences] == want
    assert len(started) == 1 and started[0] is not None
    assert llm.llm_engine.list_loras() == {1, 2, 3, 4}


def test_chunked_prefill_and_emulated_cuda_graphs(lora_setup: dict) -> None:
    """A 7-token budget chunks the prompts across steps, mixed with decodes; decode steps replay
    (emulated) graphs padded past the batch, reading the slot index from the static tensor."""
    prompts = PROMPTS
    llm = LLM(
        lora_setup["model"],
        device="cpu",
        dtype="float32",
        enable_lora=True,
        max_loras=4,
        max_num_batched_tokens=7,
        max_cuda_graph_batch_size=8,
    )
    runner = llm.llm_engine.executor.runner
    runner.capture_cuda_graphs(emulate=True)
    replayed: list[int] = []
    replay = runner.graph_runner.replay
    runner.graph_runner.replay = lambda md: replayed.append(md.cuda_graph_size) or replay(md)
    _check(llm, lora_setup, prompts, MIXED)
    assert replayed and any(size not in (1, 2, 4, 8) or size > 1 for size in replayed)


def test_graph_variant_without_lora_for_base_only_steps(lora_setup: dict) -> None:
    """Emulated graphs bake in their LoRA variant as real ones do. Base-model requests alone on a
    LoRA engine replay the graphs captured without LoRA and launch no LoRA kernel (eager prefills
    skip it too); a batch mixing the base model and adapters that follows replays the LoRA variant,
    and base-only steps after it the variant without again: PEFT-exact tokens throughout (a graph
    without LoRA replayed for a step with an adapter token would drop the adapter's term)."""
    llm = LLM(
        lora_setup["model"], device="cpu", dtype="float32", enable_lora=True, max_loras=4,
        max_cuda_graph_batch_size=8,
    )  # fmt: skip
    runner = llm.llm_engine.executor.runner
    runner.capture_cuda_graphs(emulate=True)
    graph_runner, lora = runner.graph_runner, runner.lora
    assert graph_runner.num_graphs == 2 * len(graph_runner.sizes)  # with and without LoRA per size
    shrinks = []
    for layer in lora.layers.values():
        layer.shrink = lambda *args, _shrink=layer.shrink: shrinks.append(1) or _shrink(*args)
    has_adapter: list[bool] = []  # per step, from what the runner hands prepare_step
    prepare = lora.prepare_step
    lora.prepare_step = lambda adapters, *a: has_adapter.append(any(adapters)) or prepare(adapters, *a)
    replays: list[tuple[bool, bool | None]] = []  # (the step has an adapter token, variant replayed)
    replay = graph_runner.replay
    graph_runner.replay = lambda md: (
        replays.append((has_adapter[-1], graph_runner.replay_variant())) or replay(md)
    )

    _check(llm, lora_setup, PROMPTS[:3], [None] * 3)  # 3 decodes padded to a graph of 4
    assert replays and all(variant is False for _, variant in replays)
    assert shrinks == []  # no LoRA kernel in any step, eager or replayed
    replays.clear()
    _check(llm, lora_setup, PROMPTS, MIXED)
    assert replays and all(with_adapter and variant is True for with_adapter, variant in replays)
    assert shrinks
    replays.clear()
    shrinks.clear()
    _check(llm, lora_setup, PROMPTS[3:5], [None] * 2)  # base-only again, after adapter steps
    assert replays and all(variant is False for _, variant in replays) and shrinks == []
    del lora.prepare_step, graph_runner.replay


def test_slot_reuse_leaves_nothing_of_the_previous_adapter(lora_setup: dict) -> None:
    """One slot, one reused host image: r8-all (every projection, rank 8) then r2-kup (k and up,
    rank 2) through the same slot leave exactly what r2-kup alone writes into a fresh engine."""
    import numpy as np

    from engine.config import EngineConfig
    from engine.worker.model_runner import ModelRunner

    reqs = lora_setup["requests"]

    def slot_after(names: list[str]) -> torch.Tensor:
        config = EngineConfig(
            model=lora_setup["model"], device="cpu", dtype="float32", num_kv_blocks=8, enforce_eager=True,
            enable_lora=True, max_loras=1,
        )  # fmt: skip
        runner = ModelRunner(config.resolve())
        runner.load_model()
        for name in names:
            runner.lora.prepare_step([runner.lora.add(reqs[name])], [1], 1)
        assert runner.lora.num_slot_loads == len(names)
        assert np.array_equal(runner.lora.batch.token_slots[:1].numpy(), [0])
        return runner.lora.slot_weights[0].clone()

    reused = slot_after(["r8-all", "r2-kup"])
    fresh = slot_after(["r2-kup"])
    assert torch.equal(reused, fresh) and fresh.abs().sum() > 0


def test_preemption(lora_setup: dict) -> None:
    # 3 + 2 + 2 + 3 blocks of 8 for the prompts, 4 + 3 + 3 + 4 with the outputs: 11 force preemption
    picked = [1, 3, 4, 6]
    prompts = [PROMPTS[i] for i in picked]
    llm = LLM(
        lora_setup["model"],
        device="cpu",
        dtype="float32",
        enable_lora=True,
        max_loras=4,
        block_size=8,
        num_kv_blocks=11,
        admission_reserve_tokens=0,  # admission keeps no room: the running requests preempt to grow
    )
    _check(llm, lora_setup, prompts, [MIXED[i] for i in picked])
    assert llm.llm_engine.stats().num_preemptions > 0


def test_two_slots_prefix_cache_and_adapter_registry(lora_setup: dict, tmp_path: Path) -> None:
    """One engine with two slots: (1) four adapters in flight, never more than two per step; (2) one
    prompt under the base model and two adapters, twice: each gets its own output although the same
    tokens are cached under another adapter, and the second round hits each one's own blocks; (3)
    add_lora / remove_lora / list_loras, with an adapter evicted from the host cache and reloaded."""
    reqs = lora_setup["requests"]
    llm = LLM(lora_setup["model"], device="cpu", dtype="float32", enable_lora=True, max_loras=2, block_size=8)
    engine = llm.llm_engine
    scheduler = engine.scheduler
    schedule = scheduler.schedule
    most = []

    def counting_schedule():  # noqa: ANN202
        out = schedule()
        most.append(len({scheduler.requests[r].lora_int_id for r in out.num_scheduled_tokens} - {0}))
        return out

    scheduler.schedule = counting_schedule
    _check(llm, lora_setup, PROMPTS, MIXED)
    assert max(most) == 2
    assert engine.executor.runner.lora.num_slot_loads >= 4  # four adapters through two slots
    del scheduler.schedule

    prompt = PROMPTS[2]  # 33 tokens: 4 full blocks; MIXED ran it under r8-all above
    hits = [engine.stats().prefix_cache_hits]
    for _ in range(2):
        for adapter in (None, "r8-all", "r16-regex"):  # one at a time: the earlier blocks are cached
            _check(llm, lora_setup, [prompt], [adapter])
        hits.append(engine.stats().prefix_cache_hits)
    assert hits[1] - hits[0] == 32  # only r8-all's own blocks, from the mixed batch
    assert hits[2] - hits[1] == 3 * 32  # each its own

    assert [r.lora_int_id for r in engine.lora_requests()] == [1, 2, 3, 4]  # in the order first used
    assert engine.add_lora(reqs["r4-qv"]) is False
    with pytest.raises(InvalidRequestError, match=r"lora_int_id 1 is already adapter 'r4-qv'"):
        engine.add_lora(LoRARequest("other", 1, reqs["r8-all"].lora_path))
    with pytest.raises(InvalidRequestError, match=r"an adapter named 'r4-qv' is already loaded"):
        engine.add_lora(LoRARequest("r4-qv", 9, reqs["r8-all"].lora_path))
    assert engine.executor.runner.lora.cached_ids() == [2, 3]  # max_cpu_loras = max_loras = 2
    _check(llm, lora_setup, PROMPTS[1:3], ["r4-qv", "r16-regex"])  # r4-qv reloaded from disk
    assert engine.remove_lora("r8-all") is True and engine.remove_lora(2) is False
    assert engine.remove_lora(3) is True
    assert [r.lora_name for r in engine.lora_requests()] == ["r4-qv", "r2-kup"]

    # a bad adapter is refused with its error, before anything is queued; the engine goes on
    bad = Path(tmp_path / "rank64")
    shutil.copytree(reqs["r16-regex"].lora_path, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))
    with pytest.raises(LoRAAdapterError, match=r"^LoRA adapter 'big': r: rank 64 is above max_lora_rank 16"):
        llm.generate(PROMPTS[:1], _greedy(), use_tqdm=False, lora_request=LoRARequest("big", 7, str(bad)))
    assert not engine.has_unfinished_requests() and engine.list_loras() == {1, 4}
    _check(llm, lora_setup, PROMPTS[:2], [None, "r2-kup"])


def test_lora_request_refused_when_lora_is_off(lora_setup: dict) -> None:
    from engine.inputs.input_processor import InputProcessor

    processor = InputProcessor(None, 512, 256, 16, 100, [2])
    with pytest.raises(InvalidRequestError, match=r"lora_request names adapter 'r4-qv', but LoRA is off"):
        processor.process("a", [5, 6, 7], _greedy(), lora_request=lora_setup["requests"]["r4-qv"])


def test_async_engine_generates_with_adapters(lora_setup: dict) -> None:
    """The async engine: an adapter added ahead (on the worker thread), one loaded on first use by
    generate(), the base model, concurrently; remove_lora takes it off the list."""
    import asyncio

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    reqs = lora_setup["requests"]
    adapters = ["r8-all", "r2-kup", None]

    async def main() -> tuple[list[list[int]], set[int], bool, set[int]]:
        config = EngineConfig(
            model=lora_setup["model"], device="cpu", dtype="float32", enable_lora=True, max_loras=2
        )
        async with AsyncEngine(config) as engine:
            assert await engine.add_lora(reqs["r8-all"]) is True

            async def run(i: int, adapter: str | None) -> list[int]:
                lora = reqs[adapter] if adapter else None
                final = None
                async for out in engine.generate(PROMPTS[i], _greedy(), f"req-{i}", lora_request=lora):
                    final = out
                assert final is not None and final.finished
                return final.outputs[0].token_ids

            tokens = await asyncio.gather(*(run(i, a) for i, a in enumerate(adapters)))
            loaded = engine.list_loras()
            removed = await engine.remove_lora(reqs["r8-all"].lora_int_id)
            return list(tokens), loaded, removed, engine.list_loras()

    tokens, loaded, removed, after = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert tokens == [lora_setup["expected"](PROMPTS[i], a) for i, a in enumerate(adapters)]
    assert loaded == {2, 4} and removed and after == {4}


@pytest.mark.parametrize(
    "family",
    [
        "gemma2",
        "granite",
        "olmo2",
        "olmo",
        "stablelm",
        "starcoder2",
        "phi",
        "gpt_neox",
        "glm4",
        "cohere2",
        "exaone4",
        "arcee",
        "apertus",
        "gptj",
    ],
)
def test_family_adapter_matches_peft(tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str) -> None:
    """An adapter on all seven projections of the families whose decoders are not Llama's: Gemma 2
    (GeGLU MLP, windowed softcapped attention), Granite (biases on every projection the adapter adds
    to, residual and attention multipliers, logits scaling), OLMo 2 (q/k norms over all heads after
    the adapted projections, post-norms), OLMo 1 (q/k/v clamped after the adapted projections) and
    StableLM (q/k/v biases, a quarter of each head rotated, LayerNorms); on StarCoder2's six (its plain
    MLP's c_fc and c_proj and the four attention ones, all with biases; windowed attention) and Phi's six
    (`dense` for the output projection, fc1 and fc2, in its parallel block), and GPT-NeoX's three outside
    its fused q/k/v (named `gpt_neox.layers.N.attention.dense` and `...mlp.dense_h_to_4h` in PEFT's keys),
    GLM-4-0414's six (q/k/v, whose q and k B rows weir reorders as it reordered their weights for its
    interleaved rope, o_proj, down_proj and the checkpoint's fused gate_up_proj whole; post-norms after each
    branch), Command R7B's seven (interleaved rope too, in its parallel block) and EXAONE 4.0's seven (q/k
    normed per head after the adapted projections, post-norms) and Arcee's six (its ungated ReLU² MLP's
    up_proj and down_proj: up_proj is no fused layer's half there), and Apertus's six (xIELU between them,
    q/k normed per head after the adapted projections), and GPT-J's six under its checkpoint's names
    (`transformer.h.N.attn.out_proj`, `mlp.fc_in`: interleaved rope on a quarter of each head, a parallel block)."""
    model_dir = tiny_model_dirs[family]
    targets = ADAPTERS["r8-all"][2]
    if family == "starcoder2":  # its six projections: the MLP is c_fc -> GELU -> c_proj
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
    if family == "phi":  # the output projection is `dense`, the MLP fc1 -> GELU -> fc2
        targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    if family == "gpt_neox":  # all but the fused query_key_value (refused: tests/e2e/test_gpt_neox.py)
        targets = ["dense", "dense_h_to_4h", "dense_4h_to_h"]
    if family in ("arcee", "apertus"):  # their six: the MLP has no gate (up_proj -> activation -> down_proj)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    if family == "gptj":  # transformer.h.N.attn.{q,k,v,out}_proj (q/k's B rows reordered), mlp.fc_in / fc_out
        targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
    if family == "glm4":  # q/k's B rows reordered as their weights (interleaved rope); gate and up fused
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    random_peft_adapter(model_dir, tmp_path / "all", targets, r=8, lora_alpha=16)
    adapter = LoRARequest("all", 1, str(tmp_path / "all"))
    prompts = PROMPTS[:3]
    want = peft_greedy(model_dir, tmp_path / "all", prompts, MAX_TOKENS)
    with LLM(str(model_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8) as llm:
        got = [
            o.outputs[0].token_ids
            for o in llm.generate(prompts, _greedy(), use_tqdm=False, lora_request=adapter)
        ]
        base = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    assert got == want and got != base

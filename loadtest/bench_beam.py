"""B1-B3: beam search and parallel sampling, Llama-3-8B shape (random weights).

    python loadtest/bench_beam.py --shape llama3-8b --peer hf --out b.json

B1  beam width 4 over 64 prompts of 256 tokens, 256 output tokens (ignore_eos): output tok/s (the
    returned beams' tokens, 64 x 4 x 256) vs transformers generate(num_beams=4, num_return_sequences=4)
    in static batches (the peer capped by --peer-max-requests / --peer-max-steps and extrapolated, as in
    the other scripts). Target >= 10x.
B2  B1 vs weir's own n=4 sampling on the same prompts (the same output tokens). Target >= 0.8x.
    B2 is unseeded sampling (a user's default); B2_seeded gives every request a seed (each row
    then draws its own noise), the B2 of runs before 2026-12-03's third session.
B3  n=8 on a 1,024-token prompt: TTFT vs n=1 (median of --b3-iters, each on its own prompt so the
    prefix cache does not help), and the KV blocks in use at the peak vs the prompt once plus each
    child's own blocks. Targets TTFT <= 1.2x n=1's; blocks = prompt once + children.

One engine serves B1-B3 (warmed up first), then it is freed and the peer runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    build_llm,
    engine_info,
    engine_kwargs,
    free_engine,
    install_signal_handlers,
    phase,
    random_workload,
    ratio,
    resolve_model,
)
from loadtest.hf_peer import HFPeer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--b3-prompt-len", type=int, default=1024)
    p.add_argument("--b3-n", type=int, default=8)
    p.add_argument("--b3-output-len", type=int, default=64)
    p.add_argument("--b3-iters", type=int, default=5)
    p.add_argument("--token-id-max", type=int, default=10000)
    p.add_argument(
        "--no-host-ranking-b1",
        action="store_true",
        help="skip B1 run again with the beams ranked on the host (the engine's --no-beam-device-ranking)",
    )
    add_common_args(p, default_shape="llama3-8b")
    return p


def _prompts(n: int, length: int, seed: int, id_max: int) -> list[list[int]]:
    return random_workload(n, (length, length), (1, 1), seed, id_max).prompts


class _StepCounts:
    """The engine's step loop over one run: forward passes launched, stalls (trips that launched
    nothing and only waited for the step in flight: a beam group's next step needs its candidates
    ranked on the host) and the seconds of each host phase. On a GPU, steps twice the output length
    mean the beam groups took turns (half the sequences per step); stalls near the output length
    mean they moved together and the device idled while the host ranked."""

    def __init__(self, llm: Any) -> None:
        engine = llm.llm_engine
        self._times, self._pipeline = engine.step_times, engine.pipeline
        self._start = dict(self._times.as_dict(), stalls=self._pipeline.num_stalls)

    def result(self) -> dict[str, Any]:
        now = dict(self._times.as_dict(), stalls=self._pipeline.num_stalls)
        out: dict[str, Any] = {k: now[k] - self._start[k] for k in ("steps", "stalls")}
        out["host_s"] = {k: round(now[k] - self._start[k], 4) for k in ("schedule", "launch", "update")}
        out["device_wait_s"] = round(now["device_wait"] - self._start["device_wait"], 4)
        return out


def run_b1(llm: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from engine import BeamSearchParams

    params = BeamSearchParams(args.beam_width, args.output_len, ignore_eos=True)
    counts = _StepCounts(llm)
    t0 = time.perf_counter()
    outs = llm.beam_search(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(s.tokens) - len(p) for o, p in zip(outs, prompts, strict=True) for s in o.sequences)
    return {
        "beam_width": args.beam_width,
        "elapsed_s": round(elapsed, 4),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / elapsed, 2),
        "beams_per_prompt": statistics.fmean(len(o.sequences) for o in outs),
        "counting": "every returned beam's generated tokens (prompts x width x output_len)",
        "step_loop": counts.result(),
    }


def run_b2(llm: Any, prompts: list[list[int]], args: argparse.Namespace, seeded: bool) -> dict[str, Any]:
    """n = width sampling on the same prompts: unseeded (what a user runs by default), or with a
    per-request seed (every row draws its own noise)."""
    from engine import SamplingParams

    params = SamplingParams(
        n=args.beam_width,
        temperature=1.0,
        max_tokens=args.output_len,
        ignore_eos=True,
        seed=args.seed if seeded else None,
    )
    counts = _StepCounts(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {
        "n": args.beam_width,
        "seeded": seeded,
        "elapsed_s": round(elapsed, 4),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / elapsed, 2),
        "step_loop": counts.result(),
    }


def _one_request(engine: Any, tag: str, prompt: list[int], n: int, max_tokens: int) -> tuple[float, int]:
    """TTFT of one request alone (add_request to the first step output with a token) and the most KV
    blocks in use at once while it ran."""
    from engine import SamplingParams

    kv = engine.scheduler.kv_cache_manager
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, output_kind="delta")
    t0 = time.perf_counter()
    engine.add_request(tag, prompt, params)
    first = None
    peak = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        peak = max(peak, kv.num_blocks - kv.num_free_blocks)
        if first is None and any(c.token_ids_delta for o in outs for c in o.outputs):
            first = time.perf_counter()
    return (first or time.perf_counter()) - t0, peak


def run_b3(llm: Any, args: argparse.Namespace, id_max: int) -> dict[str, Any]:
    engine = llm.llm_engine
    bs = engine.scheduler.block_size
    plen, n, out_len = args.b3_prompt_len, args.b3_n, args.b3_output_len
    ttft: dict[int, list[float]] = {1: [], n: []}
    peaks: dict[int, int] = {}
    for i in range(args.b3_iters):
        for width in (1, n):  # interleaved, so drift hits both alike
            (prompt,) = _prompts(1, plen, args.seed + 1000 + 2 * i + (width > 1), id_max)
            t, peak = _one_request(engine, f"b3-{width}-{i}", prompt, width, out_len)
            ttft[width].append(t)
            peaks[width] = max(peaks.get(width, 0), peak)
    # The prompt's full blocks once; each child its own copy of the block holding the last prompt token
    # (each computes that token itself) and the blocks of its outputs.
    shared = (plen - 1) // bs
    per_child = -(-(plen + out_len) // bs) - shared
    expected = shared + n * per_child
    t1, tn = statistics.median(ttft[1]), statistics.median(ttft[n])
    return {
        "prompt_len": plen,
        "n": n,
        "output_len": out_len,
        "block_size": bs,
        "ttft_ms_n1": round(t1 * 1000, 3),
        f"ttft_ms_n{n}": round(tn * 1000, 3),
        "ttft_ratio": ratio(tn, t1),
        "ttft_ms_all": {str(k): [round(x * 1000, 3) for x in v] for k, v in ttft.items()},
        "kv_blocks_peak_n1": peaks[1],
        f"kv_blocks_peak_n{n}": peaks[n],
        "kv_blocks_prompt_once_plus_children": expected,
        "kv_blocks_without_sharing": n * -(-(plen + out_len) // bs),
    }


def run_peer(model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """transformers generate(num_beams=k, num_return_sequences=k) in static batches of prompts, timed
    like HFPeer (first --peer-max-steps steps, extrapolated to output_len)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    peer = HFPeer(model, seed=args.seed)
    try:
        sub = prompts[: args.peer_max_requests or len(prompts)]
        steps = min(args.output_len, args.peer_max_steps or args.output_len)
        # Each prompt runs beam_width sequences: the memory estimate is per sequence.
        seqs = peer.pick_batch_size(
            len(sub) * args.beam_width, args.input_len, args.input_len + args.output_len
        )
        batch = args.peer_batch_size or max(1, seqs // args.beam_width)

        class _Clock(StoppingCriteria):
            def __init__(self) -> None:
                self.times: list[float] = []

            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                peer._sync()
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def generate(chunk: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
            ids = torch.tensor(chunk, dtype=torch.long, device=peer.device)  # equal lengths: no padding
            clock = _Clock()
            peer._sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                peer.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    num_beams=args.beam_width,
                    num_return_sequences=args.beam_width,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    eos_token_id=None,
                    pad_token_id=0,
                    stopping_criteria=StoppingCriteriaList([clock]),
                )
            peer._sync()
            return t0, [t0, *clock.times]

        generate(sub[:1], 4)  # warm-up
        total_s = 0.0
        batches = []
        for i in range(0, len(sub), batch):
            chunk = sub[i : i + batch]
            t0, times = generate(chunk, steps)
            prefill = times[1] - t0 if len(times) > 1 else 0.0
            gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
            full = prefill + statistics.fmean(gaps) * (args.output_len - 1) if gaps else times[-1] - t0
            total_s += full
            batches.append(
                {"size": len(chunk), "measured_s": round(times[-1] - t0, 3), "batch_s": round(full, 3)}
            )
            print(f"[peer] batch {len(batches)}: {len(chunk)} prompts, {full:.1f}s extrapolated", flush=True)
        tokens = len(sub) * args.beam_width * args.output_len
        return {
            "name": "transformers generate(num_beams)",
            "beam_width": args.beam_width,
            "batch_size_prompts": batch,
            "requests_run": len(sub),
            "requests_total": len(prompts),
            "max_steps_per_batch": steps,
            "extrapolated": len(sub) < len(prompts) or steps < args.output_len,
            "elapsed_s": round(total_s, 3),
            "output_tokens": tokens,
            "output_tok_s": round(tokens / total_s, 2),
            "batches": batches,
            "model_build_s": round(peer.build_seconds, 3),
        }
    finally:
        peer.close()


def _b1_phase(
    report: Report, llm: Any, prompts: list[list[int]], args: argparse.Namespace, key: str, label: str
) -> None:
    with phase(report, key):
        report["results"][key] = b1 = run_b1(llm, prompts, args)
        print(
            f"[{key}] {label}: {b1['output_tok_s']} output tok/s "
            f"({b1['step_loop']['steps']} steps, {b1['step_loop']['stalls']} stalls)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = resolve_model(args)
    id_max = min(args.token_id_max, model.vocab_size)
    prompts = _prompts(args.num_prompts, args.input_len, args.seed, id_max)
    report = Report("B", args, model)
    report["workload"] = {
        "b1_b2": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "width": args.beam_width,
        },
        "b3": {"prompt_len": args.b3_prompt_len, "n": args.b3_n, "output_len": args.b3_output_len},
    }
    needed = max(args.input_len + args.output_len, args.b3_prompt_len + args.b3_output_len) + 8
    kwargs = engine_kwargs(args, model, max_model_len=args.max_model_len or needed)
    results = report["results"]
    llm, build_s = build_llm(model, kwargs)
    try:
        report["engine"] = {**engine_info(llm), "engine_build_s": round(build_s, 3)}
        with phase(report, "warmup"):
            from engine import BeamSearchParams, SamplingParams

            llm.beam_search(prompts[:4], BeamSearchParams(args.beam_width, 8, ignore_eos=True))
            llm.generate(
                prompts[:4], SamplingParams(n=args.beam_width, max_tokens=8, ignore_eos=True), use_tqdm=False
            )
        _b1_phase(report, llm, prompts, args, "B1", f"beam width {args.beam_width}")
        if not args.no_host_ranking_b1:
            # The same search ranked on the host (each group waits for its ranking; the engine's
            # --no-beam-device-ranking), in the same engine: what the device ranking changes.
            scheduler = llm.llm_engine.scheduler
            device_ranking, scheduler.beam_device_ranking = scheduler.beam_device_ranking, False
            try:
                _b1_phase(report, llm, prompts, args, "B1_host_ranking", "host ranking")
            finally:
                scheduler.beam_device_ranking = device_ranking
        for key, seeded in (("B2", False), ("B2_seeded", True)):
            with phase(report, key):
                results[key] = run_b2(llm, prompts, args, seeded)
                b2 = results[key]
                print(
                    f"[{key}] n={args.beam_width} sampling{' (per-request seed)' if seeded else ''}: "
                    f"{b2['output_tok_s']} output tok/s "
                    f"({b2['step_loop']['steps']} steps, {b2['step_loop']['stalls']} stalls)",
                    flush=True,
                )
        with phase(report, "B3"):
            results["B3"] = run_b3(llm, args, id_max)
            b3 = results["B3"]
            print(
                f"[B3] TTFT n={args.b3_n} / n=1 = {b3['ttft_ratio']}; KV blocks at peak "
                f"{b3[f'kv_blocks_peak_n{args.b3_n}']} (prompt once + children: "
                f"{b3['kv_blocks_prompt_once_plus_children']}; no sharing: {b3['kv_blocks_without_sharing']})",
                flush=True,
            )
    finally:
        free_engine(llm)
    if "hf" in str(args.peer):
        with phase(report, "peer", required=False):
            report["peer"] = run_peer(model, prompts, args)
    b1, b2, b3, peer = results.get("B1"), results.get("B2"), results.get("B3"), report["peer"]
    if b1 and peer:
        report["ratios"]["B1_beam_vs_peer"] = ratio(b1["output_tok_s"], peer["output_tok_s"])
    if b1 and b2:
        report["ratios"]["B2_beam_vs_n_sampling"] = ratio(b1["output_tok_s"], b2["output_tok_s"])
    if b1 and results.get("B1_host_ranking"):
        report["ratios"]["B1_device_vs_host_ranking"] = ratio(
            b1["output_tok_s"], results["B1_host_ranking"]["output_tok_s"]
        )
    if b1 and results.get("B2_seeded"):
        report["ratios"]["B2_beam_vs_seeded_n_sampling"] = ratio(
            b1["output_tok_s"], results["B2_seeded"]["output_tok_s"]
        )
    if b3:
        report["ratios"]["B3_ttft_n_over_n1"] = b3["ttft_ratio"]
        report["ratios"]["B3_kv_blocks_over_prompt_once_plus_children"] = ratio(
            b3[f"kv_blocks_peak_n{args.b3_n}"], b3["kv_blocks_prompt_once_plus_children"]
        )
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())

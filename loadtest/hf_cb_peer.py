"""The second transformers peer: its own continuous batching (`init_continuous_batching`, the engine behind
`generate_batch` and `transformers serve`), with paged attention and CUDA graphs, on T1/T2's workload.

    python loadtest/bench_throughput.py --workload t2 --shape llama3-8b --peer hf,hf-cb --out t2.json

Every request is queued at once (as weir's offline run) with its own `max_new_tokens` and no EOS (eos -1:
each runs to its length, as `ignore_eos`); the clock runs from the first `add_request` to the last
finished result, after a warm-up batch on other prompts. Its library defaults are not what a careful user
runs (with sdpa they turn CUDA graphs and async batching off), so the flags below carry the tuning its
documentation suggests: CUDA graphs on, async double-buffering on, flash attention when installed (else
paged sdpa), and the KV budget, batch-token budget and page size left to its memory sizing unless given.
`--hf-cb-variants defaults,tuned` runs the library defaults too and reports both; the best is the peer.

The API moved between transformers 5.x releases (page_size was block_size, `paged|sdpa` became `sdpa`,
auto_switch_to_flash and WorkloadHints arrived later): options the installed version lacks are dropped and
listed in the JSON (`setting.dropped`), and `setting.resolved` is the configuration the library resolved.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import time
from typing import Any

from loadtest.common import (
    ModelChoice,
    Report,
    Workload,
    free_device_memory,
    peer_names,
    phase,
    summarize_ms,
)

PROGRESS_S = 15.0  # seconds between progress lines of a run
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3")
VARIANTS = ("tuned", "defaults")
# What the JSON reports of the configuration the library resolved (read after the cache is built).
RESOLVED_FIELDS = (
    "page_size",
    "block_size",
    "num_blocks",
    "max_batch_tokens",
    "max_memory_percent",
    "max_requests_per_batch",
    "max_blocks_per_request",
    "use_cuda_graph",
    "use_async_batching",
    "default_compile_level",
    "allow_block_sharing",
)


def add_hf_cb_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transformers continuous-batching peer (--peer hf-cb)")
    g.add_argument(
        "--hf-cb-attn",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="attention implementation: auto = flash attention 3/2 when installed, else paged sdpa",
    )
    g.add_argument("--hf-cb-cuda-graphs", choices=("on", "off", "auto"), default="on", help="auto: library's")
    g.add_argument(
        "--hf-cb-async-batching",
        choices=("on", "off", "auto"),
        default="on",
        help="double-buffered batches (CPU work hidden behind the GPU); auto: library's",
    )
    g.add_argument("--hf-cb-max-batch-tokens", type=int, default=None, help="tokens per step (default: its)")
    g.add_argument("--hf-cb-num-blocks", type=int, default=None, help="KV blocks (default: from memory)")
    g.add_argument("--hf-cb-page-size", type=int, default=None, help="tokens per KV page (default: its 256)")
    g.add_argument(
        "--hf-cb-max-memory-percent",
        type=float,
        default=0.9,
        help="fraction of free memory for the KV cache (the library picks 0.8-0.9)",
    )
    g.add_argument("--hf-cb-max-requests-per-batch", type=int, default=None)
    g.add_argument("--hf-cb-compile-level", type=int, default=0, help="torch.compile level 0-3 (0: none)")
    g.add_argument(
        "--hf-cb-max-requests",
        type=int,
        default=None,
        help="run the first N requests only (default: the whole workload)",
    )
    g.add_argument(
        "--hf-cb-variants",
        default="tuned",
        help=f"comma list of {', '.join(VARIANTS)}: tuned = the flags above, defaults = the library's own",
    )
    g.add_argument("--hf-cb-warmup-requests", type=int, default=16)
    g.add_argument(
        "--hf-cb-time-limit",
        type=float,
        default=None,
        help="seconds for the measured run: past it the figures are those of the requests finished by then "
        "(the JSON says how many); none finished is an error (default: 3600, all must finish)",
    )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _accepted(fn_or_cls: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The kwargs that fn_or_cls takes (by its dataclass fields or signature), and the names it does not."""
    if dataclasses.is_dataclass(fn_or_cls):
        names = {f.name for f in dataclasses.fields(fn_or_cls)}
    else:
        params = inspect.signature(fn_or_cls).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return kwargs, []
        names = set(params)
    return {k: v for k, v in kwargs.items() if k in names}, sorted(k for k in kwargs if k not in names)


def _has_new_attention_api() -> bool:
    """True when CB takes plain 'sdpa' (auto_switch_to_flash exists); older 5.x want 'paged|sdpa'."""
    from transformers.generation import ContinuousBatchingConfig

    return "auto_switch_to_flash" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}


def _flag(value: str) -> bool | None:
    return {"on": True, "off": False}.get(value)


def cb_options(args: argparse.Namespace, variant: str, device: str) -> dict[str, Any]:
    """ContinuousBatchingConfig keyword arguments for a variant (before dropping what the version lacks)."""
    if variant == "defaults":
        return {}
    opts: dict[str, Any] = {
        "use_cuda_graph": _flag(args.hf_cb_cuda_graphs),
        # Async batching needs a CUDA (or XPU) device; on a CPU the library's own choice (off) stands.
        "use_async_batching": _flag(args.hf_cb_async_batching) if device == "cuda" else None,
        "max_batch_tokens": args.hf_cb_max_batch_tokens,
        "num_blocks": args.hf_cb_num_blocks,
        "max_memory_percent": args.hf_cb_max_memory_percent,
        "max_requests_per_batch": args.hf_cb_max_requests_per_batch,
        "default_compile_level": args.hf_cb_compile_level or None,
    }
    if args.hf_cb_page_size:
        opts["page_size"] = opts["block_size"] = args.hf_cb_page_size  # renamed in 5.17; one of them is kept
    if args.hf_cb_attn == "sdpa":
        opts["auto_switch_to_flash"] = False
    opts["seed"] = args.seed
    return {k: v for k, v in opts.items() if v is not None}


class HFContinuousBatchingPeer:
    """One transformers model at the workload's shape (random weights) driven by its continuous batching."""

    def __init__(self, model: ModelChoice, attn: str, seed: int = 0) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.device = model.device
        self.requested_attn = attn
        config = AutoConfig.from_pretrained(model.model_dir)
        load_attn = {"auto": "sdpa", "sdpa": "sdpa", "eager": "eager"}.get(attn, attn)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=getattr(torch, model.dtype), attn_implementation=load_attn
            )
        self.model.eval()
        if attn == "sdpa" and not _has_new_attention_api():
            self.model.set_attn_implementation("paged|sdpa")  # older 5.x: the prefix keeps it from flash
        self._sync()
        self.build_seconds = time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        del self.model
        free_device_memory()

    def _manager(self, options: dict[str, Any], workload: Workload, temperature: float) -> tuple[Any, dict]:
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        cb_kwargs, dropped = _accepted(ContinuousBatchingConfig, options)
        if "page_size" in cb_kwargs and "block_size" in cb_kwargs:
            del cb_kwargs["block_size"]  # the new name wins; block_size is deprecated where both exist
        sample = temperature > 0
        gen = GenerationConfig(
            max_new_tokens=max(workload.output_lens),
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            eos_token_id=-1,  # no EOS: every request runs to its own max_new_tokens (ignore_eos)
            pad_token_id=0,
        )
        init_kwargs: dict[str, Any] = {
            "generation_config": gen,
            "continuous_batching_config": ContinuousBatchingConfig(**cb_kwargs),
        }
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            init_kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(map(len, workload.prompts)),
                max_generated_length=max(workload.output_lens),
                num_requests=len(workload),
            )
        except ImportError:
            pass
        init_kwargs, dropped_init = _accepted(self.model.init_continuous_batching, init_kwargs)
        manager = self.model.init_continuous_batching(**init_kwargs)
        setting = {"requested": options, "dropped": dropped + dropped_init}
        return manager, setting

    def _run_requests(
        self, manager: Any, workload: Workload, tag: str, timeout_s: float, partial_ok: bool = False
    ) -> dict[str, Any]:
        """Queue every request at once; wait for all (or, with partial_ok, until timeout_s; nothing
        generated by then is an error either way). Per-request token times when the library records them.
        With partial_ok the requests stream (when the library can), so the tokens of requests still
        running at the deadline are counted too (`generated_tokens`), not only the finished ones'.
        Prints progress every PROGRESS_S seconds, so a run cut short by an outer timeout says how far
        it got."""
        wanted = {"record_timestamps": True, "eos_token_id": -1} | ({"streaming": True} if partial_ok else {})
        extra, _ = _accepted(manager.add_request, wanted)
        streamed = bool(extra.get("streaming"))
        t0 = time.perf_counter()
        ids = {}
        for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
            rid = manager.add_request(prompt, request_id=f"{tag}-{i}", max_new_tokens=out_len, **extra)
            ids[rid] = out_len
        done: dict[str, Any] = {}
        generated: dict[str, int] = {}  # request -> tokens so far (streamed results carry all of them)
        deadline = t0 + timeout_s
        next_progress = t0 + PROGRESS_S
        timed_out = False
        while len(done) < len(ids):
            now = time.perf_counter()
            if now > next_progress:
                print(
                    f"[peer hf-cb {tag}] {len(done)}/{len(ids)} requests done after {now - t0:.0f}s",
                    flush=True,
                )
                next_progress = now + PROGRESS_S
            if now > deadline:
                if not (partial_ok and (done or any(generated.values()))):
                    raise TimeoutError(f"{len(done)}/{len(ids)} requests done after {timeout_s:g}s")
                timed_out = True
                break
            result = manager.get_result(timeout=min(1.0, max(deadline - now, 0.01)))
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(
                        f"the continuous-batching loop stopped with {len(done)}/{len(ids)} done"
                    )
                continue
            if result.request_id not in ids:
                continue
            generated[result.request_id] = len(result.generated_tokens)
            finished = getattr(result, "is_finished", None)
            if finished is None or finished():
                done[result.request_id] = result
        self._sync()
        elapsed = time.perf_counter() - t0
        errors = [r.error for r in done.values() if getattr(r, "error", None)]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        ttfts, gaps = [], []
        for r in done.values():
            stamps = list(getattr(r, "timestamps", None) or [])
            if stamps:
                ttfts.append(stamps[0] - t0)
                gaps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return {
            "elapsed_s": elapsed,
            "output_tokens": sum(len(r.generated_tokens) for r in done.values()),
            "generated_tokens": sum(generated.values()),  # finished or not
            "streamed": streamed,
            "completed": len(done),
            "prompt_tokens": sum(len(p) for rid, p in zip(ids, workload.prompts, strict=True) if rid in done),
            "timed_out": timed_out,
            "ttfts": ttfts,
            "gaps": gaps,
        }

    def run(
        self,
        workload: Workload,
        options: dict[str, Any],
        temperature: float,
        warmup: Workload | None,
        time_limit_s: float | None = None,
    ) -> dict[str, Any]:
        t_init = time.perf_counter()
        manager, setting = self._manager(options, workload, temperature)
        try:
            if hasattr(manager, "warmup"):
                manager.warmup()  # CUDA graphs captured (and compiled, if asked) before the clock starts
            manager.start()
            setting["init_and_warmup_s"] = round(time.perf_counter() - t_init, 3)
            print(
                f"[peer hf-cb] manager built, warmed up and started in {setting['init_and_warmup_s']}s",
                flush=True,
            )
            if warmup is not None and len(warmup):
                t_warm = time.perf_counter()
                self._run_requests(manager, warmup, "warm", timeout_s=600)
                setting["warm_requests_s"] = round(time.perf_counter() - t_warm, 3)
                print(
                    f"[peer hf-cb] {len(warmup)} warm-up requests in {setting['warm_requests_s']}s",
                    flush=True,
                )
            setting["attn_implementation"] = getattr(self.model.config, "_attn_implementation", None)
            cfg = getattr(manager, "continuous_batching_config", None)
            setting["resolved"] = {
                k: _plain(getattr(cfg, k)) for k in RESOLVED_FIELDS if getattr(cfg, k, None) is not None
            }
            limited = time_limit_s is not None
            res = self._run_requests(
                manager, workload, "run", timeout_s=time_limit_s if limited else 3600, partial_ok=limited
            )
        finally:
            manager.stop(block=True, timeout=30)
            destroy = getattr(manager, "destroy", None)
            if callable(destroy):
                destroy()
        elapsed = res["elapsed_s"]
        # Output tokens over the run: every request's when all finished; when a time limit cut the run
        # short, every token generated by then (streamed: unfinished requests' too), or, if the library
        # could not stream, the finished requests' only (a lower bound of its rate).
        lower_bound = res["timed_out"] and not res["streamed"]
        counted = res["output_tokens"] if lower_bound or not res["timed_out"] else res["generated_tokens"]
        # elapsed to 4 decimals, as bench_throughput rounds its own (a tiny run takes milliseconds)
        return {
            "elapsed_s": round(elapsed, 4),
            "output_tokens": res["output_tokens"],
            "output_tokens_in_window": res["generated_tokens"],
            "expected_output_tokens": workload.num_output_tokens,
            "requests_completed": res["completed"],
            "time_limited": res["timed_out"],
            "tokens_counted": "finished requests only" if lower_bound else "every token generated in the run",
            "req_s": round(res["completed"] / elapsed, 4),
            "output_tok_s": round(counted / elapsed, 2),
            "total_tok_s": round((res["output_tokens"] + res["prompt_tokens"]) / elapsed, 2),
            **summarize_ms(res["gaps"], "itl"),
            **summarize_ms(res["ttfts"], "ttft"),
            "setting": setting,
        }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def run_hf_cb_peer(
    report: Report, model: ModelChoice, args: argparse.Namespace, workload: Workload, warmup: Workload
) -> dict[str, Any] | None:
    """Run the continuous-batching peer (when --peer names hf-cb) for each variant, as a non-fatal phase;
    returns the best variant's figures (by output tok/s), with every variant's under `variants`."""
    if "hf-cb" not in peer_names(args):
        return None
    variants = [v.strip() for v in args.hf_cb_variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--hf-cb-variants: expected a comma list of {', '.join(VARIANTS)}, got {bad}")
    sub = workload.head(args.hf_cb_max_requests)
    warm = warmup.head(args.hf_cb_warmup_requests)
    results: dict[str, Any] = {}
    for variant in variants:
        with phase(report, f"peer_hf_cb_{variant}", required=False):
            attn = args.hf_cb_attn if variant == "tuned" else "auto"  # defaults: sdpa, or flash if installed
            peer = HFContinuousBatchingPeer(model, attn, seed=args.seed)
            try:
                res = peer.run(
                    sub,
                    cb_options(args, variant, model.device),
                    args.temperature,
                    warm,
                    args.hf_cb_time_limit,
                )
            finally:
                peer.close()
            res.update(model_build_s=round(peer.build_seconds, 3), variant=variant)
            if res["time_limited"]:
                report.note(
                    f"hf-cb {variant}: {res['requests_completed']}/{len(sub)} requests finished within "
                    f"--hf-cb-time-limit {args.hf_cb_time_limit:g}s; its output tok/s counts "
                    f"{res['tokens_counted']}"
                )
            elif res["output_tokens"] != res["expected_output_tokens"]:
                report.note(
                    f"hf-cb {variant}: generated {res['output_tokens']} of {res['expected_output_tokens']}"
                )
            results[variant] = res
            print(
                f"[peer hf-cb {variant}] {res['output_tok_s']:.1f} output tok/s, {res['req_s']:.2f} req/s "
                f"in {res['elapsed_s']:.1f}s ({res['setting'].get('attn_implementation')}, "
                f"{res['setting'].get('resolved')})",
                flush=True,
            )
    if not results:
        return None
    best = max(results, key=lambda v: results[v]["output_tok_s"])
    out = {
        "name": "transformers continuous batching (init_continuous_batching)",
        "transformers": _transformers_version(),
        "best_variant": best,
        **results[best],
        "requests_run": len(sub),
        "requests_total": len(workload),
        "extrapolated": len(sub) < len(workload),
        "variants": results,
        "counting": "every request queued at once, each to its own output length (eos disabled)",
    }
    if out["extrapolated"]:
        report.note(f"hf-cb peer ran the first {len(sub)}/{len(workload)} requests")
    return out

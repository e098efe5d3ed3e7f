"""The transformers generate() peer of the throughput and latency benchmarks: the same shape with random
weights, run in static batches (`--peer hf`), as a non-fatal phase of a report."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtest.common import (  # noqa: E402
    DTYPE_BYTES,
    ModelChoice,
    Report,
    Workload,
    free_device_memory,
    peer_names,
    phase,
    summarize_ms,
)


class HFPeer:
    """transformers generate() at the same shape with random weights, in static batches.

    The ignore_eos equivalent is min_new_tokens=max_new_tokens with eos_token_id=None. A static batch runs
    to its longest output; only the workload's own output tokens are counted.
    """

    def __init__(self, model: ModelChoice, seed: int = 0) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.device = model.device
        self.dtype = getattr(torch, model.dtype)
        self.model_choice = model
        config = AutoConfig.from_pretrained(model.model_dir)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        gc_ = self.model.generation_config
        gc_.eos_token_id = None
        gc_.pad_token_id = 0
        self._sync()
        self.build_seconds = time.perf_counter() - t0
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        del self.model
        free_device_memory()

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, max_steps: int | None = None
    ) -> dict[str, Any]:
        """One static batch, left-padded. Returns times: prefill (to the first token), per-step times,
        and the batch time, extrapolated to max_new_tokens when max_steps cut it short."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        device, sync = self.device, self._sync

        class _Clock(StoppingCriteria):
            """Called after every new token; records when it arrived (syncing, as generate() does anyway)."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                sync()
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        steps = max_new_tokens if max_steps is None else max(2, min(max_new_tokens, max_steps))
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        clock = _Clock()
        sample = temperature > 0
        extra: dict[str, Any] = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=sample,
                eos_token_id=None,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([clock]),
                **extra,
            )
        sync()
        t_end = time.perf_counter()
        generated = int(out.shape[1]) - width
        del out, ids, mask
        times = clock.times
        prefill = times[0] - t0 if times else t_end - t0
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        if steps < max_new_tokens and gaps:
            batch_time = prefill + statistics.fmean(gaps) * (max_new_tokens - 1)
        else:
            batch_time = t_end - t0
        return {
            "prefill_s": prefill,
            "gaps_s": gaps,
            "steps_run": generated,
            "steps_full": max_new_tokens,
            "measured_s": t_end - t0,
            "batch_s": batch_time,
        }

    def pick_batch_size(self, requested: int, max_prompt: int, max_seq: int) -> int:
        """The requested batch, halved while a rough memory estimate says it cannot fit (cuda only).

        Estimate per sequence: the KV cache at max_seq, plus prefill activations (MLP intermediates and
        attention scores) at max_prompt. OOM at run time halves further.
        """
        if self.device != "cuda":
            return requested
        cfg = self.model_choice.config
        h, ffn = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or h // n_heads)
        layers = int(cfg["num_hidden_layers"])
        b = DTYPE_BYTES[self.model_choice.dtype]
        kv = 2 * layers * n_kv * head_dim * b * max_seq
        act = (
            max_prompt * b * (4 * ffn + 8 * h + 2 * n_heads * head_dim)
            + b * n_heads * max_prompt * max_prompt
        )
        free, _total = self.torch.cuda.mem_get_info()
        budget = 0.85 * free
        bs = max(1, requested)
        while bs > 1 and bs * (kv + act) > budget:
            bs //= 2
        return bs

    def run(
        self,
        workload: Workload,
        batch_size: int,
        temperature: float,
        max_requests: int | None = None,
        max_steps: int | None = None,
    ) -> dict[str, Any]:
        """Static batches over (the first max_requests of) the workload, in workload order.

        Throughput counts the workload's output tokens; time is measured, or extrapolated per batch from
        the first max_steps decode steps. With a request subset, throughput is the subset's (per-token
        rates are what carry over; the partial last batch of the full set is not modelled, which slightly
        favours the peer).
        """
        oom_type = getattr(self.torch, "OutOfMemoryError", None) or self.torch.cuda.OutOfMemoryError
        sub = workload.head(max_requests)
        bs = self.pick_batch_size(min(batch_size, len(sub)), max(map(len, sub.prompts)), sub.max_seq_len)
        first_bs = bs
        # Warm-up (excluded): one short batch, so kernels and allocator pools exist.
        self.generate_batch([p[:16] for p in sub.prompts[: min(bs, 4)]], 4, temperature)
        batches: list[dict[str, Any]] = []
        oom_retries = 0
        i = 0
        while i < len(sub):
            prompts = sub.prompts[i : i + bs]
            outs = sub.output_lens[i : i + bs]
            failed = False
            try:
                res = self.generate_batch(prompts, max(outs), temperature, max_steps)
            except oom_type:
                failed = True
            if failed:
                free_device_memory()
                if bs == 1:
                    raise RuntimeError("the peer runs out of memory even at batch size 1")
                bs //= 2
                oom_retries += 1
                print(f"[peer] OOM: retrying with batch size {bs}", flush=True)
                continue
            res.update(size=len(prompts), output_tokens=sum(outs), prompt_tokens=sum(map(len, prompts)))
            batches.append(res)
            print(
                f"[peer] batch {len(batches)}: {len(prompts)} seqs, {res['steps_run']}/{res['steps_full']} steps, "
                f"{res['measured_s']:.1f}s measured, {res['batch_s']:.1f}s full",
                flush=True,
            )
            i += len(prompts)
        total_s = sum(b["batch_s"] for b in batches)
        out_tokens = sum(b["output_tokens"] for b in batches)
        prompt_tokens = sum(b["prompt_tokens"] for b in batches)
        gaps = [g for b in batches for g in b["gaps_s"]]
        # TTFT with everything arriving at t=0: a request waits for the batches before its own.
        ttfts, clock = [], 0.0
        for b in batches:
            ttfts += [clock + b["prefill_s"]] * b["size"]
            clock += b["batch_s"]
        extrapolated = len(sub) < len(workload) or any(b["steps_run"] < b["steps_full"] for b in batches)
        return {
            "name": "transformers generate()",
            "batch_size": bs,
            "batch_size_first_tried": first_bs,
            "oom_retries": oom_retries,
            "requests_run": len(sub),
            "requests_total": len(workload),
            "max_steps_per_batch": max_steps,
            "extrapolated": extrapolated,
            "measured_s": round(sum(b["measured_s"] for b in batches), 3),
            "elapsed_s": round(total_s, 3),
            "output_tokens": out_tokens,
            "req_s": round(len(sub) / total_s, 4),
            "output_tok_s": round(out_tokens / total_s, 2),
            "total_tok_s": round((out_tokens + prompt_tokens) / total_s, 2),
            **summarize_ms(gaps, "itl"),
            **summarize_ms(ttfts, "ttft"),
            "model_build_s": round(self.build_seconds, 3),
            "counting": "the workload's output tokens; a static batch runs to its longest output",
        }


def run_peer(
    report: Report, model: ModelChoice, args: argparse.Namespace, workload: Workload, default_batch: int
) -> dict[str, Any] | None:
    """Run the HF peer on the workload (when --peer hf) as a non-fatal phase; frees it afterwards."""
    if "hf" not in peer_names(args):
        return None
    result: dict[str, Any] | None = None
    with phase(report, "peer", required=False):
        peer = HFPeer(model, seed=args.seed)
        try:
            result = peer.run(
                workload,
                batch_size=args.peer_batch_size or default_batch,
                temperature=args.temperature,
                max_requests=args.peer_max_requests,
                max_steps=args.peer_max_steps,
            )
        finally:
            peer.close()
        if result["extrapolated"]:
            steps = f"the first {args.peer_max_steps} decode steps" if args.peer_max_steps else "every step"
            report.note(
                f"peer extrapolated: {result['requests_run']}/{result['requests_total']} requests run, "
                f"{steps} of each batch timed"
            )
        report["peer"] = result
    return result

"""The offline API, with vLLM's names: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.config import EngineConfig
from engine.core.sampling_params import SamplingParams
from engine.errors import InvalidRequestError
from engine.gc_tuning import gen0_threshold, young_collections_every
from engine.inputs.chat_messages import conversation_of
from engine.inputs.tokenizer import render_chat
from engine.llm_engine import LLMEngine
from engine.lora.request import LoRARequest
from engine.outputs.request_output import RequestOutput

Prompt = str | list[int]


class LLM:
    """Batch generation over the engine: every prompt is queued at once and continuously batched.

    `with LLM(...) as llm:` (or `llm.shutdown()`) frees the GPU memory at a known point, so the next
    engine built in the same process gets it for its KV cache.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        if model is None:  # the checkpoint shipped inside the package, found from any directory
            model = str(importlib.resources.files("engine") / "default_model")
        # WEIR_GC_GEN0 is read by every generate(); a bad value is refused here, before the model
        # loads, not at the first call.
        gen0_threshold()
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._next_id = 0

    def shutdown(self) -> None:
        """Free the model, KV cache and CUDA graphs now (dropping the last reference does too: the
        engine is in no reference cycle). Afterwards generate() raises EngineShutdownError."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json values (temperature, top_p, ...)."""
        return SamplingParams(**self.llm_engine.model_config.generation_defaults)

    def get_tokenizer(self):  # noqa: ANN201 - weir's FastTokenizer or a transformers tokenizer (engine/inputs/tokenizer.py)
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. `lora_request`: the LoRA
        adapter for every prompt, or one per prompt (None: the base model); needs enable_lora=True."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            # A dict would be taken as a list of its keys and fail as an AttributeError inside.
            params_list = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [None]
            bad = next((p for p in params_list if not isinstance(p, SamplingParams)), False)
            if bad is not False:
                raise TypeError(
                    "sampling_params must be a SamplingParams or a list of them; got "
                    f"{type(sampling_params if bad is None else bad).__name__}"
                )
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are {len(prompt_list)} prompts"
                )
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"priority has {len(priority)} entries but there are {len(prompt_list)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompt_list)
        elif not isinstance(lora_request, (list, tuple)):  # a name string would be a list of letters
            raise TypeError(
                f"lora_request must be a LoRARequest, None or a list of them; got {type(lora_request).__name__}"
            )
        else:
            lora_list = list(lora_request)
            if len(lora_list) != len(prompt_list):
                raise ValueError(
                    f"lora_request has {len(lora_list)} entries but there are {len(prompt_list)} prompts"
                )
        return self._run(prompt_list, params_list, priority, use_tqdm, lora_list)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate. A bad message
        raises InvalidRequestError (a ValueError) naming it and its field, as the server's chat route
        answers the same input (engine/inputs/chat_messages.py), instead of failing in the template."""
        if isinstance(messages, list) and messages and isinstance(messages[0], list):
            conversations = [conversation_of(conv, f"messages[{c}]") for c, conv in enumerate(messages)]
        else:
            conversations = [conversation_of(messages)]
        prompts = [
            render_chat(self.llm_engine.tokenizer, conv, add_generation_prompt, chat_template)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self,
        prompts: Sequence[str | list[int] | dict[str, Any]],
        params: BeamSearchParams,
        use_tqdm: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt (text, token ids, or vLLM's {"prompt": ...} /
        {"prompt_token_ids": [...]}), as transformers' generate(num_beams=beam_width,
        num_return_sequences=beam_width, do_sample=False, length_penalty, early_stopping): each
        output's beam_width sequences, best first. Bad parameters raise InvalidRequestError.
        `lora_request`: the LoRA adapter every beam runs with (enable_lora=True)."""
        sampling_params = params.to_sampling_params()
        if isinstance(prompts, (str, dict)):  # one prompt, as generate() takes it (not one per letter)
            prompts = [prompts]
        prompt_list: list[Prompt] = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                if "prompt_token_ids" not in p and "prompt" not in p:
                    raise InvalidRequestError(
                        "prompt", f"prompts[{i}] is a dict without 'prompt' or 'prompt_token_ids'"
                    )
                p = p["prompt_token_ids"] if "prompt_token_ids" in p else p["prompt"]
            prompt_list.append(p)
        outputs = self._run(
            prompt_list,
            [sampling_params] * len(prompt_list),
            None,
            use_tqdm,
            [lora_request] * len(prompt_list),
        )
        lp = params.length_penalty
        return [
            BeamSearchOutput(
                [
                    BeamSearchSequence(
                        tokens=out.prompt_token_ids + list(c.token_ids),
                        cum_logprob=c.cumulative_logprob or 0.0,
                        text=c.text,
                        score=(c.cumulative_logprob or 0.0) / max(len(c.token_ids), 1) ** lp,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason if isinstance(c.stop_reason, int) else None,
                    )
                    for c in out.outputs
                ]
            )
            for out in outputs
        ]

    def _run(
        self,
        prompts: list[Prompt],
        params_list: list[SamplingParams],
        priority: Sequence[int] | None,
        use_tqdm: bool,
        lora_list: list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                request_id = str(self._next_id)
                self._next_id += 1
                params = params.copy()
                params.output_kind = "final_only"  # only finished outputs are returned
                engine.add_request(
                    request_id,
                    prompt,
                    params,
                    priority=priority[i] if priority else 0,
                    lora_request=lora_list[i] if lora_list else None,
                )
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            raise
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar, young_collections_every():
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
        return [finals[i] for i in ids]


def _as_prompt_list(prompts: str | Sequence[str] | Sequence[list[int]]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):  # an int or None failed in list() with no name
        raise TypeError(
            f"prompts must be a string, a list of strings or a list of token-id lists; got {type(prompts).__name__}"
        )
    out = list(prompts)
    if out and isinstance(out[0], int):
        return [list(out)]  # a single prompt given as token ids
    return out  # type: ignore[return-value]

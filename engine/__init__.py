"""weir's serving core, importable without the HTTP stack.

from engine import LLM, SamplingParams
"""

from engine.config import EngineConfig
from engine.core.sampling_params import SamplingParams
from engine.lora.request import LoRARequest
from engine.outputs.request_output import CompletionOutput, Logprob, RequestOutput

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncEngine",
    "EngineConfig",
    "SamplingParams",
    "LoRARequest",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the bookkeeping modules stay importable without torch
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name in ("BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"):
        from engine import beam_search

        return getattr(beam_search, name)
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

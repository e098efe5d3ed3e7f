"""The adapter a request runs with: vLLM's `LoRARequest` names, so offline code carries over."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """`lora_name` is what the server lists and a request's `model` selects; `lora_int_id` (>= 1) is
    the adapter's identity inside the engine (0 is the base model: slot keys, prefix-cache keys);
    `lora_path` is a directory holding adapter_config.json and adapter_model.safetensors."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if (
            not isinstance(self.lora_int_id, int)
            or isinstance(self.lora_int_id, bool)
            or self.lora_int_id < 1
        ):
            raise ValueError(
                f"lora_int_id must be an integer >= 1 (0 is the base model); got {self.lora_int_id!r}"
            )
        if not self.lora_path:
            raise ValueError(f"lora_path of adapter {self.lora_name!r} must name a directory")

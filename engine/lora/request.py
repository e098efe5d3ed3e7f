"""The adapter a request runs with: vLLM's `LoRARequest` names, so offline code carries over."""

from __future__ import annotations

from dataclasses import dataclass

# The fair policy's weights (an adapter's share, the prompt and output token weights) lie in (0, this].
MAX_FAIR_WEIGHT = 1e6


def valid_fair_weight(value: object) -> bool:
    """Whether `value` may be a share (LoRARequest.fair_share, --lora-shares) or a token weight
    (EngineConfig.fair_prompt_token_weight / fair_output_token_weight): a real number, not a bool,
    in (0, MAX_FAIR_WEIGHT] (NaN and infinity are not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= MAX_FAIR_WEIGHT


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """`lora_name` is what the server lists and a request's `model` selects; `lora_int_id` (>= 1) is
    the adapter's identity inside the engine (0 is the base model: slot keys, prefix-cache keys);
    `lora_path` is a directory holding adapter_config.json and adapter_model.safetensors."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    # Under scheduling_policy "fair": this adapter's share of the service against the others (the base
    # model's is 1). An adapter of share 2 is charged half the weighted tokens for the same work, so it
    # is served about twice as much while both wait (weighted VTC). Ignored under "fcfs".
    fair_share: float = 1.0

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
        if not valid_fair_weight(self.fair_share):
            raise ValueError(
                f"fair_share of adapter {self.lora_name!r} must be a number in (0, 1e6]; "
                f"got {self.fair_share!r}"
            )

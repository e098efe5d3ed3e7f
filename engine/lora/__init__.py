"""Multi-LoRA: adapters in the PEFT format served over one base model (issue 13).

`LoRARequest` names the adapter a request runs with; `LoRAConfig` (engine.config) bounds how many
run at once. The rest of the package (loading, slots, layers) lands with the engine part of the issue.
"""

from engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]

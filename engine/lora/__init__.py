"""Multi-LoRA: adapters in the PEFT format served over one base model (issue 13).

`LoRARequest` names the adapter a request runs with; `LoRAConfig` (engine.config) bounds how many
run at once. The package: `adapter` (PEFT loading and checks), `layers` (the LoRA hook on linear
layers, stacked slots), `manager` (the runner's host cache, slots and per-token slot index). Only the
torch-free names are imported here, so bookkeeping can import this package.
"""

from engine.errors import LoRAAdapterError
from engine.lora.request import LoRARequest

__all__ = ["LoRAAdapterError", "LoRARequest"]

"""The adapters this server serves: served name -> `LoRARequest`, each with an id of its own.

Ids are handed out once and never reused: the engine keys its adapter slots and its prefix cache by
`lora_int_id`, so an adapter unloaded and loaded again under the same name (perhaps from another
directory) must not find the old one's weights or KV blocks.
"""

from __future__ import annotations

import asyncio

from engine.lora.request import LoRARequest


class LoRARegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, LoRARequest] = {}
        self._next_id = 1  # 0 is the base model
        # One load or unload at a time, so a name is checked and taken atomically.
        self.lock = asyncio.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def new_request(self, name: str, path: str, fair_share: float = 1.0) -> LoRARequest:
        """A request for a new adapter, with a fresh id; `add` it once the engine has loaded it."""
        request = LoRARequest(name, self._next_id, path, fair_share)
        self._next_id += 1
        return request

    def add(self, request: LoRARequest) -> None:
        self._by_name[request.lora_name] = request

    def remove(self, name: str) -> LoRARequest | None:
        return self._by_name.pop(name, None)

    def all(self) -> list[LoRARequest]:
        """Served adapters, in the order they were added."""
        return list(self._by_name.values())

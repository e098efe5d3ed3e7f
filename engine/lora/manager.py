"""The model runner's LoRA state: adapters loaded on the host (an LRU cache of max_cpu_loras), the
max_loras device slots every LoRA layer stacks, and the per-token slot index of each step.

A step's adapters get slots before its forward (`prepare_step`): those already in a slot keep it;
the others take the least recently used slots no adapter of this step needs (the scheduler never
puts more than max_loras distinct adapters in one step).

Writing a slot: every layer's slots live in one device tensor [max_loras, slot_numel], so a slot of
the whole model is one contiguous region. The adapter is packed on the host into a slot image (a
pinned buffer allocated once, at start: no pinned allocation per adapter) and copied with ONE
host->device copy, queued on the device stream after the step before it, so a step in flight still
reads the weights it was launched with. (It was 2 memsets and up to 6 copies per layer from
per-tensor pinned copies of the adapter: about 700 launches and 450 pinned allocations for a
rank-16 Llama-3-8B adapter.) The pinned image costs one slot of host memory (Llama-3-8B at
max_lora_rank 16: 32 layers x (A 623K + block-diagonal B 1.34M elements) x 2 bytes = 120 MiB).

Per step: a step with no adapter token writes nothing (its LoRA term is skipped, eagerly or by
replaying a graph captured without it); a step with adapters writes its per-token slot index from a
reused pinned buffer (one copy, no pinned allocation).

Requests hold their adapter (a LoRAAdapter object) for as long as the runner holds them: an adapter
removed or evicted from the cache while requests run on it still serves them to the end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from engine.config import LoRAConfig
from engine.lora.adapter import LoRAAdapter, load_adapter
from engine.lora.layers import LoRABatch, LoRALinear, lora_targets
from engine.lora.request import LoRARequest
from engine.lora.segments import build_segments, segment_piece
from engine.model.layers.linear import LinearBase
from engine.worker.attention_metadata import PinnedStaging
from ops import Kernels
from ops.env_flags import env_flag

logger = logging.getLogger("weir.engine")

# Host slot images the manager may hold (each one slot of every layer: 120 MiB for Llama-3-8B at rank 16,
# pinned on CUDA): so many adapter loads can be in flight before a load waits for a copy to finish.
IMAGE_RING = 4


class LoRAManager:
    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        kernels: Kernels,
        device: torch.device,
        dtype: torch.dtype,
        max_num_tokens: int,  # the most tokens one forward may carry (steps, graphs, the profile)
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.targets, self.num_slices = lora_targets(model)
        self.batch = LoRABatch(max_num_tokens, device)
        # Segment kernels (one program per run of one adapter's tokens) with the Triton kernels;
        # WEIR_LORA_SEGMENTS=0 keeps the tile kernels (ops/triton/lora.py) for every step.
        self.batch.use_segments = kernels.name == "triton" and env_flag("WEIR_LORA_SEGMENTS")
        self.layers: dict[str, LoRALinear] = {}
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                lora = LoRALinear(
                    module,
                    self.batch,
                    config.max_loras,
                    config.max_lora_rank,
                    kernels.lora_shrink,
                    kernels.lora_expand,
                    triton_kernels=kernels.name == "triton",
                )
                module.lora = lora
                self.layers[name] = lora
        slot_numel = sum(layer.slot_numel for layer in self.layers.values())
        # [max_loras, slot_numel]: every layer's stacks are views of it (GBs at 64 slots)
        self.slot_weights = torch.zeros(config.max_loras, slot_numel, dtype=dtype, device=device)
        offset = 0
        for layer in self.layers.values():
            layer.bind(self.slot_weights, offset)
            offset += layer.slot_numel
        self._pin = device.type == "cuda"
        # [slot_numel] host images of one slot, each packed then copied whole (pinned on CUDA; the same
        # path on CPU). Zeroed once: the blocks no adapter writes (fused layers' off-diagonal B) stay
        # zero. A ring of them (allocated as loads need them, up to IMAGE_RING): a slot's copy waits
        # in the stream behind the step in flight (it may overwrite a slot that step reads), so with
        # one image a second load in a step would wait on the host for that whole step before packing.
        self._slot_numel = slot_numel
        self._images: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # (image, its last copy)
        self._next_image = 0
        # lora_int_id -> adapter, least recently used first.
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._cache_lock = threading.Lock()  # loads may run off the worker thread
        self._slots: list[LoRAAdapter | None] = [None] * config.max_loras
        self._slot_of: dict[LoRAAdapter, int] = {}  # by identity
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(config.max_loras))
        self._index_staging = PinnedStaging() if self._pin else None  # the per-token index's copies
        self.num_slot_loads = 0
        # Host seconds of the last adapter read from disk (add) and the last slot image written
        # (_load_slot; the copy to the device after it is asynchronous): where A4's latency goes.
        self.last_load_s = 0.0
        self.last_slot_write_s = 0.0

    # ------------------------------------------------------------------ host cache
    def load(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter from disk (raises LoRAAdapterError). Touches no shared state."""
        # Pageable host tensors: slot writes go through the pinned slot image (_load_slot).
        return load_adapter(
            lora_request, self.targets, self.num_slices, self.config.max_lora_rank, self.dtype
        )

    def add(self, lora_request: LoRARequest) -> LoRAAdapter:
        """The cached adapter of this request, loading it if needed (most recently used now)."""
        with self._cache_lock:
            adapter = self._cache.get(lora_request.lora_int_id)
            if adapter is not None and adapter.lora_request == lora_request:
                self._cache.move_to_end(lora_request.lora_int_id)
                return adapter
        t0 = time.perf_counter()
        adapter = self.load(lora_request)
        self.last_load_s = time.perf_counter() - t0
        with self._cache_lock:
            self._cache[lora_request.lora_int_id] = adapter
            self._cache.move_to_end(lora_request.lora_int_id)
            while len(self._cache) > self.config.max_cpu_loras:
                evicted_id, _ = self._cache.popitem(last=False)
                logger.info("LoRA adapter %d evicted from the host cache (max_cpu_loras)", evicted_id)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests running on it keep it until they finish."""
        with self._cache_lock:
            return self._cache.pop(lora_int_id, None) is not None

    def cached_ids(self) -> list[int]:
        with self._cache_lock:
            return list(self._cache)

    # ------------------------------------------------------------------ per step
    @staticmethod
    def group_by_adapter(requests: dict, scheduled: dict[str, int]) -> dict[str, int]:
        """The step's requests ordered by adapter (stable; the base model first), so that a token
        tile of the LoRA kernels holds few adapters: each tile reads the weights of every adapter
        in it. Unchanged when the step has at most one adapter."""
        keys = {}
        for req_id in scheduled:
            state = requests.get(req_id)
            keys[req_id] = state.lora.lora_int_id if state is not None and state.lora is not None else 0
        if len(set(keys.values())) <= 1:
            return scheduled
        return {req_id: scheduled[req_id] for req_id in sorted(scheduled, key=keys.__getitem__)}

    def prepare_step(
        self,
        adapters: list[LoRAAdapter | None],  # per scheduled sequence, in flat-batch order
        num_scheduled: list[int],  # per sequence
        num_tokens: int,  # the forward's token count (with a graph's padding)
    ) -> None:
        """Give the step's adapters slots and write the per-token slot index (padding: -1).

        A step without adapters only sets `batch.active` False: nothing reads the index then (the
        layers skip the LoRA term; a graph step replays the variant captured without it)."""
        needed = {a: None for a in adapters if a is not None}
        if not needed:
            self.batch.active = False
            return
        if len(needed) > len(self._slots):
            raise RuntimeError(f"{len(needed)} adapters in one step; there are {len(self._slots)} slots")
        self.batch.active = True
        free = [s for s in self._slot_lru if self._slots[s] not in needed]  # least recently used first
        for adapter in needed:
            slot = self._slot_of.get(adapter)
            if slot is None:
                slot = free.pop(0)
                self._load_slot(slot, adapter)
            self._slot_lru.move_to_end(slot)
        slot_of = self._slot_of
        per_seq = np.fromiter(
            (-1 if a is None else slot_of[a] for a in adapters), dtype=np.int32, count=len(adapters)
        )
        n = int(sum(num_scheduled))
        token_slots = np.repeat(per_seq, num_scheduled)  # [n]
        segments = build_segments(token_slots, segment_piece(num_tokens)) if self.batch.use_segments else None
        size = num_tokens + (len(segments) if segments is not None else 0)
        if self._index_staging is not None:  # reused pinned memory: asynchronous copies
            staged = self._index_staging.take(4 * size).view(torch.int32)
        else:
            staged = torch.empty(size, dtype=torch.int32)
        src = staged[:num_tokens]
        host = src.numpy()  # [num_tokens]
        host[:n] = token_slots
        host[n:] = -1
        self.batch.token_slots[:num_tokens].copy_(src, non_blocking=self._pin)
        if segments is not None:
            seg_src = staged[num_tokens:]
            seg_src.numpy()[:] = segments
            self.batch.segments[: len(segments)].copy_(seg_src, non_blocking=self._pin)
        if self._index_staging is not None:
            self._index_staging.record_copy()

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Pack the adapter into a slot image and copy it into the slot: one copy for every layer."""
        old = self._slots[slot]
        if old is not None:
            del self._slot_of[old]
        self._slots[slot] = adapter
        self._slot_of[adapter] = slot
        t0 = time.perf_counter()
        i, image = self._take_image()
        for name, layer in self.layers.items():
            layer.write_slot_image(image, adapter.layers.get(name))
        self.slot_weights[slot].copy_(image, non_blocking=self._pin)
        if self._pin:
            copied = torch.cuda.Event()
            copied.record()
            self._images[i] = (image, copied)
        self.num_slot_loads += 1
        self.last_slot_write_s = time.perf_counter() - t0

    def _take_image(self) -> tuple[int, torch.Tensor]:
        """The next image of the ring and its index, once its last copy to the device is done: a new one
        while the ring is short of IMAGE_RING and the oldest is still copying (CUDA), else the oldest."""
        ring = self._images
        i = self._next_image % max(len(ring), 1)
        if ring and (event := ring[i][1]) is not None and not event.query() and len(ring) < IMAGE_RING:
            i = len(ring)  # every image still copying: one more rather than a wait
        if i == len(ring):
            ring.append((torch.zeros(self._slot_numel, dtype=self.dtype, pin_memory=self._pin), None))
        image, copied = ring[i]
        if copied is not None:
            copied.synchronize()  # only when IMAGE_RING loads are in flight at once
        self._next_image = i + 1
        return i, image

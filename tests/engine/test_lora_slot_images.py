"""The LoRA manager's ring of host slot images (engine/lora/manager.py): a load takes an image whose copy to
the device is done, or a new one while the ring is short, and waits only when every image is still being
copied; on CPU (no copies in flight) one image serves every load. Slot contents stay the adapters'."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.lora import manager as manager_module


class _Copy:
    """A stand-in for a recorded torch.cuda.Event: pending until `done`, counting host waits."""

    def __init__(self, done: bool) -> None:
        self.done = done
        self.waits = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


def _manager(tiny_llama_dir: Path):  # noqa: ANN202
    from engine.config import EngineConfig
    from engine.worker.model_runner import ModelRunner

    config = EngineConfig(
        model=str(tiny_llama_dir), device="cpu", dtype="float32", num_kv_blocks=8, enforce_eager=True,
        enable_lora=True, max_loras=2,
    )  # fmt: skip
    runner = ModelRunner(config.resolve())
    runner.load_model()
    return runner.lora


def test_loads_take_a_new_image_while_the_others_are_copying_then_wait_for_the_oldest(
    tiny_llama_dir: Path,
) -> None:
    m = _manager(tiny_llama_dir)
    _, first = m._take_image()
    assert len(m._images) == 1
    m._images[0] = (first, _Copy(done=True))
    i, again = m._take_image()
    assert i == 0 and again is first  # its copy is done: reused, no new image
    pending = [_Copy(done=False)]
    m._images[0] = (first, pending[0])
    for n in range(2, manager_module.IMAGE_RING + 1):  # each load while all others copy: one more image
        i, image = m._take_image()
        assert i == n - 1
        assert len(m._images) == n and all(image is not other for other, _ in m._images[: n - 1])
        pending.append(_Copy(done=False))
        m._images[n - 1] = (image, pending[-1])
    assert all(c.waits == 0 for c in pending)
    i, oldest = m._take_image()  # the ring is full and every copy pending: wait for the oldest
    assert (
        i == 0 and oldest is first and pending[0].waits == 1 and len(m._images) == manager_module.IMAGE_RING
    )


def test_on_cpu_one_image_serves_every_load_and_slots_hold_their_adapters(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import json

    from engine.lora.request import LoRARequest
    from tests.ops.test_lora_kernels import _write_adapter

    m = _manager(tiny_llama_dir)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    adapters = []
    for i, rank in enumerate((4, 8, 2)):
        _write_adapter(tmp_path / f"a{i}", config, rank)
        adapters.append(m.add(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}"))))
    for i, adapter in enumerate(adapters):  # three loads into two slots
        m._load_slot(i % 2, adapter)
    assert len(m._images) == 1 and m.num_slot_loads == 3
    # each slot holds what one packed image of its adapter holds
    for slot, adapter in ((0, adapters[2]), (1, adapters[1])):
        expected = torch.zeros(m._slot_numel, dtype=m.dtype)
        for name, layer in m.layers.items():
            layer.write_slot_image(expected, adapter.layers.get(name))
        assert torch.equal(m.slot_weights[slot], expected)

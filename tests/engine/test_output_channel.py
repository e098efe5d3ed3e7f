"""OutputChannel: FIFO order, a get that waits is woken by put, and a cancelled get loses nothing."""

from __future__ import annotations

import asyncio

from engine.outputs.output_channel import OutputChannel


def test_fifo_and_waiting_get() -> None:
    async def main() -> list[int]:
        channel: OutputChannel[int] = OutputChannel()
        channel.put(1)
        got = [await channel.get()]
        waiter = asyncio.ensure_future(channel.get())
        await asyncio.sleep(0)
        assert not waiter.done()  # nothing to take yet
        channel.put(2)
        channel.put(3)
        got.append(await waiter)
        got.append(await channel.get())
        assert len(channel) == 0
        return got

    assert asyncio.run(main()) == [1, 2, 3]


def test_cancelled_get_keeps_later_items() -> None:
    async def main() -> int:
        channel: OutputChannel[int] = OutputChannel()
        waiter = asyncio.ensure_future(channel.get())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        channel.put(7)  # no waiter now: the item stays for the next get
        assert len(channel) == 1
        return await asyncio.wait_for(channel.get(), timeout=5)

    assert asyncio.run(main()) == 7

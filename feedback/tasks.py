"""Background loops of the feedback side (monitor scheduler, grading worker): how they stop."""

from __future__ import annotations

import asyncio


async def stop_tasks(stop: asyncio.Event, tasks: list[asyncio.Task[None]], *, timeout_s: float) -> None:
    """Set `stop`, let `tasks` finish their current work within `timeout_s`, cancel what is left, and wait for it.

    Empties `tasks`, so calling it again is a no-op.
    """
    stop.set()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tasks.clear()

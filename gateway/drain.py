"""Graceful shutdown: stop being ready at once, let requests finish until a deadline,
then end what is left with an error the client can see (a terminal SSE event)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._cut: set[asyncio.Task[object]] = set()
        self._done = asyncio.Event()

    def enter(self, task: asyncio.Task[object]) -> None:
        self._tasks.add(task)

    def leave(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        self._cut.discard(task)
        if self.draining and not self._tasks:
            self._done.set()

    def was_cut(self, task: asyncio.Task[object]) -> bool:
        return task in self._cut

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self, deadline: float) -> None:
        """Wait for in-flight requests up to `deadline` seconds, then cut the rest."""
        self.draining = True
        log.info("draining %d in-flight requests (deadline %.0f s)", len(self._tasks), deadline)
        if self._tasks:
            try:
                async with asyncio.timeout(deadline):
                    await self._done.wait()
            except TimeoutError:
                log.warning("drain deadline passed: ending %d requests", len(self._tasks))
                for task in list(self._tasks):
                    self._cut.add(task)
                    task.cancel()

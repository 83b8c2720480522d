"""Stopping the gateway's background loops (usage-log flusher, token refresh and sharing).

A loop is stopped by cancelling it, but a client library may catch the cancellation
(redis-py can turn it into its own timeout error when both land together), and the loop
then goes back to sleep as if nothing happened. ``stop`` cancels again until the task
is done, within a bound, so shutdown cannot hang on it.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("gateway")

_RETRY_SECONDS = 0.05


async def stop(task: asyncio.Task[None], grace: float = 5.0) -> None:
    """Cancel ``task`` and wait until it is done; after ``grace`` seconds, warn and return."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RETRY_SECONDS)
        if not task.done() and loop.time() >= deadline:
            log.warning("background task %s did not stop within %.0f s", task.get_name(), grace)
            return
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("background task %s had failed: %r", task.get_name(), exc)

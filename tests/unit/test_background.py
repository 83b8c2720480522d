"""Stopping background loops whose client library may swallow a cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway import background


async def test_a_loop_that_swallows_one_cancellation_is_still_stopped() -> None:
    swallowed = 0
    rounds = 0

    async def loop() -> None:
        nonlocal swallowed, rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)  # stands for a Redis write
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what a library turning it into its own timeout does
            await asyncio.sleep(3600)  # back to the flush interval

    task = asyncio.get_running_loop().create_task(loop())
    await asyncio.sleep(0.001)
    async with asyncio.timeout(2):
        await background.stop(task, grace=1.0)
    assert task.cancelled() and swallowed == 1 and rounds == 1


async def test_a_task_that_never_stops_is_given_up_on_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stubborn_now = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not stubborn_now:
                    raise

    task = asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await background.stop(task, grace=0.2)
    assert not task.done()
    assert "stubborn did not stop" in caplog.text
    stubborn_now = False
    await background.stop(task)
    assert task.cancelled()


async def test_a_failed_loop_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.get_running_loop().create_task(broken(), name="broken")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await background.stop(task)
    assert "broken had failed: RuntimeError('boom')" in caplog.text

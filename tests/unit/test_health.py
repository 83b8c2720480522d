"""Per-account health: cooldowns, ejection with a half-open probe, panic threshold,
quarantine and concurrency caps, on a fake clock."""

from __future__ import annotations

import logging
import random

import pytest

from gateway.health import Admission, Health


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(accounts: int = 4, **kw: float) -> tuple[Health, Clock]:
    clock = Clock()
    names = [f"a{i}" for i in range(accounts)]
    return Health({"pool": names}, clock=clock, **kw), clock  # type: ignore[arg-type]


def fail(h: Health, name: str, times: int, status: int = 503) -> None:
    for _ in range(times):
        h.failed(name, status, None)


def test_429_cools_the_account_down_for_its_retry_after() -> None:
    h, clock = make()
    h.failed("a0", 429, 2.0)
    assert h.state("a0") == "cooldown"
    assert not h.available("a0")
    assert h.acquire("a0") is Admission.REFUSED
    assert h.retry_in(["a0", "a1"]) == pytest.approx(2.0)
    clock.t += 1.9
    assert not h.available("a0")
    clock.t += 0.2
    assert h.state("a0") == "healthy" and h.available("a0")
    # A 429 is not a sickness: no probe, every request may go again.
    assert h.acquire("a0") is Admission.ADMITTED
    assert h.acquire("a0") is Admission.ADMITTED


def test_429_without_retry_after_uses_the_default_cooldown() -> None:
    h, clock = make(default_cooldown=1.5)
    h.failed("a0", 429, None)
    assert h.retry_in(["a0"]) == pytest.approx(1.5)
    clock.t += 1.6
    assert h.available("a0")


def test_a_later_429_never_shortens_a_cooldown() -> None:
    h, _ = make()
    h.failed("a0", 429, 5.0)
    h.failed("a0", 429, 1.0)
    assert h.retry_in(["a0"]) == pytest.approx(5.0)


def test_retry_in_is_the_shortest_wait_and_none_without_waits() -> None:
    h, _ = make()
    assert h.retry_in(["a0", "a1"]) is None
    h.failed("a0", 429, 7.0)
    h.failed("a1", 429, 3.0)
    assert h.retry_in(["a0", "a1", "a2"]) == pytest.approx(3.0)


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_quarantine_and_alert_once(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    h, clock = make()
    with caplog.at_level(logging.ERROR, logger="gateway.health"):
        h.failed("a2", status, None)
        h.failed("a2", status, None)
    assert h.state("a2") == "quarantined"
    assert h.alerts("a2") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "a2" in errors[0].getMessage()
    clock.t += 10_000
    h.succeeded("a2")  # an answer that was already in flight does not lift it
    h.failed("a2", 429, 1.0)
    assert h.state("a2") == "quarantined"
    assert not h.available("a2") and h.acquire("a2") is Admission.REFUSED


def test_consecutive_failures_eject_and_a_client_error_breaks_the_streak() -> None:
    h, _ = make(eject_after=3)
    fail(h, "a0", 2)
    h.failed("a0", 400, None)  # the account answered: the streak is over
    fail(h, "a0", 2)
    assert h.state("a0") == "healthy"
    fail(h, "a0", 1, status=0)  # connection errors count too
    assert h.state("a0") == "ejected" and not h.available("a0")


def test_ejection_time_grows_and_is_capped() -> None:
    h, clock = make(eject_after=1, base_ejection=10.0, max_ejection=25.0)
    waits = []
    for _ in range(3):
        fail(h, "a0", 1)
        wait = h.retry_in(["a0"])
        assert wait is not None
        waits.append(round(wait))
        clock.t += wait
        probe = h.acquire("a0")
        assert probe is Admission.PROBE
        fail(h, "a0", 1)  # the probe fails: out again, for longer
        h.release("a0", probe)
        wait = h.retry_in(["a0"])
        assert wait is not None
        waits.append(round(wait))
        clock.t += wait
        probe = h.acquire("a0")
        h.succeeded("a0")
        h.release("a0", probe)
    assert waits == [10, 20, 10, 20, 10, 20]  # success resets the growth
    fail(h, "a0", 1)
    for _ in range(3):
        clock.t += h.retry_in(["a0"]) or 0.0
        probe = h.acquire("a0")
        fail(h, "a0", 1)
        h.release("a0", probe)
    assert h.retry_in(["a0"]) == pytest.approx(25.0)


def test_half_open_admits_one_probe_at_a_time() -> None:
    h, clock = make(eject_after=1, base_ejection=10.0)
    fail(h, "a0", 1)
    clock.t += 10.0
    assert h.available("a0") and h.state("a0") == "ejected"
    probe = h.acquire("a0")
    assert probe is Admission.PROBE
    # Others skip the account while the probe is out.
    assert not h.available("a0")
    assert h.acquire("a0") is Admission.REFUSED
    h.succeeded("a0")
    h.release("a0", probe)
    assert h.state("a0") == "healthy"
    assert h.acquire("a0") is Admission.ADMITTED
    assert h.acquire("a0") is Admission.ADMITTED


def test_a_probe_that_ends_without_a_verdict_frees_the_slot_for_the_next() -> None:
    h, clock = make(eject_after=1)
    fail(h, "a0", 1)
    clock.t += 100
    probe = h.acquire("a0")
    h.release("a0", probe)  # e.g. the client went away
    assert h.state("a0") == "ejected"
    assert h.acquire("a0") is Admission.PROBE


def test_a_straggler_failing_during_the_ejection_does_not_extend_it() -> None:
    h, clock = make(eject_after=1, base_ejection=10.0)
    fail(h, "a0", 1)
    clock.t += 5
    fail(h, "a0", 1)
    assert h.retry_in(["a0"]) == pytest.approx(5.0)


def test_never_more_than_the_share_of_a_pool_is_ejected() -> None:
    h, _ = make(accounts=4, eject_after=1, max_ejected_share=0.5)
    for name in ("a0", "a1", "a2", "a3"):
        fail(h, name, 3)
    states = [h.state(n) for n in ("a0", "a1", "a2", "a3")]
    assert states.count("ejected") == 2


def test_panic_mode_keeps_at_least_one_account() -> None:
    h, _ = make(accounts=2, eject_after=1, max_ejected_share=1.0)
    fail(h, "a0", 1)
    fail(h, "a1", 5)
    assert [h.state("a0"), h.state("a1")] == ["ejected", "healthy"]
    solo, _ = make(accounts=1, eject_after=1, max_ejected_share=1.0)
    fail(solo, "a0", 10)
    assert solo.state("a0") == "healthy" and solo.available("a0")


def test_concurrency_cap_rejects_at_once_and_frees_on_release() -> None:
    h, _ = make()
    first = h.acquire("a0", 2)
    second = h.acquire("a0", 2)
    assert first and second
    assert h.acquire("a0", 2) is Admission.REFUSED
    assert h.in_flight("a0") == 2
    h.release("a0", first)
    assert h.acquire("a0", 2) is Admission.ADMITTED
    assert h.acquire("a1", None) is Admission.ADMITTED  # no cap configured


def test_troubled_is_exactly_the_accounts_routing_must_check() -> None:
    # Routing skips the availability check while `troubled` is empty, so it must hold every
    # account not in the healthy state after any sequence of verdicts.
    rng = random.Random(7)
    h, clock = make(accounts=6, eject_after=2)
    names = [f"a{i}" for i in range(6)]
    seen_troubled = 0
    for _ in range(3000):
        name = rng.choice(names)
        op = rng.random()
        if op < 0.4:
            status = rng.choice([429, 500, 503, 0, 400] * 20 + [401])
            h.failed(name, status, rng.choice([None, 0.5, 3.0]))
        elif op < 0.6:
            h.succeeded(name)
        elif op < 0.8:
            admission = h.acquire(name)
            if admission:
                h.release(name, admission)
        else:
            clock.t += rng.choice([0.1, 1.0, 20.0])
        truly = {n for n in names if h._accounts[n].state != "healthy"}
        assert h.troubled == truly
        seen_troubled += bool(truly)
        assert all(h.available(n) for n in names if n not in h.troubled)
    assert 0 < seen_troubled < 3000  # both branches of the routing shortcut were exercised

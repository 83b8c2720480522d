from __future__ import annotations

from affinity.breaker import CircuitBreaker
from tests.unit.conftest_affinity import Clock


def test_opens_on_failure_and_half_opens_for_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(cooldown=2.0, max_cooldown=5.0, clock=clock)
    assert breaker.allow() and not breaker.open
    breaker.failure()
    assert breaker.open
    assert not breaker.allow()
    clock.t += 2.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.success()
    assert not breaker.open
    assert breaker.allow()


def test_failed_probes_back_off_up_to_the_ceiling() -> None:
    clock = Clock()
    breaker = CircuitBreaker(cooldown=2.0, max_cooldown=5.0, clock=clock)
    breaker.failure()
    waits = []
    for _ in range(4):
        start = clock.t
        while not breaker.allow():
            clock.t += 0.5
        waits.append(clock.t - start)
        breaker.failure()
    assert waits == [2.0, 4.0, 5.0, 5.0]
    clock.t += 5.0
    assert breaker.allow()
    breaker.success()
    breaker.failure()  # a fresh outage starts from the base cool-down again
    clock.t += 2.0
    assert breaker.allow()


def test_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(cooldown=1.0, clock=clock)
    breaker.failure()
    clock.t += 1.0
    assert breaker.allow()
    breaker.abandon()
    assert breaker.open
    assert breaker.allow()


def test_cooling_while_no_call_may_probe() -> None:
    # Queued writes are dropped only while cooling; once a probe may go they wait for it.
    clock = Clock()
    breaker = CircuitBreaker(cooldown=2.0, clock=clock)
    assert not breaker.cooling
    breaker.failure()
    assert breaker.cooling
    clock.t += 2.0
    assert breaker.open and not breaker.cooling  # a call may probe now
    assert breaker.allow()
    assert breaker.cooling  # the probe is out
    breaker.success()
    assert not breaker.cooling and not breaker.open

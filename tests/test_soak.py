"""A short soak of the real server (bench/soak.py's code, ~12 s), and the graceful-shutdown check."""

from __future__ import annotations

from collections import Counter

import pytest

from devtools.soak import SoakResult, check_graceful_shutdown, run_soak

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out


@pytest.mark.timeout(180)
@pytest.mark.long(15)
def test_soak_keeps_the_contract_and_stays_flat():
    """Swaps, refreshes, junk, upstream faults and a flooding address at once, against two gunicorn workers.

    Flat means: after the warm-up, each worker's RSS grows by less than 10 MB and its open file
    descriptors by fewer than 20 (medians of three one-second samples, so one transient connection
    is not growth); the workers are the same processes throughout; /health answers 200 to a probe every 0.25 s,
    within 3 s here, where other tests share the machine (bench/soak.py, run alone, holds it to a second).
    """
    result = run_soak(duration=12, warmup=4, clients=6, workers=2, latency=0.02, attacker_limit=5, health_within=3)
    print(result.summary())
    assert result.problems() == []
    # The mix really ran: every kind was sent and judged, and the flooding address was held back.
    assert len(result.requests) == 14 and min(result.requests.values()) >= 10, result.requests
    # (problems() wants 429s and bounds the 400s; how many of each depends on how fast a loaded machine lets the
    # attacker ask)
    assert result.attacker_statuses[400] > 0
    assert len(result.levels) == 2


@pytest.mark.timeout(120)
def test_sigterm_lets_requests_waiting_on_a_slow_upstream_complete():
    result = check_graceful_shutdown(in_flight=10, upstream_latency=2.0, workers=2)
    print(result.summary())
    assert result.problems() == []
    assert result.answers == ["200"] * 10
    assert result.exit_code == 0
    # The master waited for them (the upstream takes 2 s), and not much longer.
    assert 1.5 <= result.exit_seconds <= 30


def test_the_verdict_catches_what_the_soak_looks_for():
    """The soak's judge, on made-up observations: a clean run passes, and each kind of trouble is named."""
    def observed(**changes) -> SoakResult:
        result = SoakResult(duration=20, warmup=5, clients=2, workers=2)
        result.requests = Counter({"swap": 50, "refresh": 50})
        result.attacker_statuses, result.attacker_allowed = Counter({400: 100, 429: 900}), 110
        result.health_probes = 80
        result.workers_before = result.workers_after = [101, 102]
        result.rss_growth_kb, result.fd_growth = {101: 500, 102: 900}, {101: 2, 102: -1}
        for name, value in changes.items():
            setattr(result, name, value)
        return result

    assert observed().problems() == []
    troubles = {
        "broke the contract": {"violation_count": 1, "violations": ["swap: HTTP 500"]},
        "workers changed": {"workers_after": [101, 103]},
        "RSS grew": {"rss_growth_kb": {101: 500, 102: 10 * 1024}},
        "open files grew": {"fd_growth": {101: 20, 102: 0}},
        "could not measure": {"rss_growth_kb": {101: 0}, "fd_growth": {101: 0}},
        "attacker": {"attacker_statuses": Counter({400: 111, 429: 5})},
        "/health": {"health_failures": ["3.0s: ReadTimeout in 1000 ms"]},
        "in the log": {"leaks_in_log": ["POST /swap code=soak-1"]},
        "tracebacks": {"tracebacks_in_log": 1},
    }
    for words, changes in troubles.items():
        problems = observed(**changes).problems()
        assert len(problems) == 1 and words in problems[0], (words, problems)

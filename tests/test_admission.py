"""The admission queue: calls in flight per client, first come first served, the turn passed on while room is left."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from admission import Admission, WindowCount


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll condition until it holds or the deadline passes; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class Calls:
    """Threads entering one Admission for one key, each holding its call until told to end it."""

    def __init__(self, admission: Admission, room: Callable[[], int], count: int, wait: float = 30.0):
        self.admission = admission
        self.entered: list[int] = []
        self.refused: list[int] = []
        self.ended = 0
        self.left = 0
        self._lock = threading.Lock()
        self._end = [threading.Event() for _ in range(count)]
        self._room = room
        self._wait = wait
        self.threads = [threading.Thread(target=self._call, args=(n,)) for n in range(count)]

    def _call(self, n: int) -> None:
        if not self.admission.enter("client", self._room, time.monotonic() + self._wait):
            with self._lock:
                self.refused.append(n)
            return
        with self._lock:
            self.entered.append(n)
        self._end[n].wait(30)
        self.admission.leave("client")
        with self._lock:
            self.left += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
            # One by one, so that their order in the queue is the order of n.
            assert wait_until(lambda: self.admission.in_flight("client") + self.admission.waiting("client")
                              + len(self.refused) > self.threads.index(thread))

    def end_one(self, succeeded: Callable[[], None] = lambda: None) -> None:
        """End the oldest call in flight, counting its success first (as the app does)."""
        assert wait_until(lambda: len(self.entered) > self.ended), "no call in flight to end"
        with self._lock:
            n = self.entered[self.ended]
            self.ended += 1
        succeeded()
        self._end[n].set()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)


def test_the_calls_at_once_grow_as_the_room_does():
    """Room 1, one more per call that succeeds, up to 11: the calls in flight follow the room.

    Handing the turn to one waiter per ended call (and no further) kept 12 such calls at one
    at a time; the turn is passed on while room is left.
    """
    successes = [0]
    admission = Admission()
    calls = Calls(admission, lambda: min(1 + successes[0], 11), 12)

    def succeed() -> None:
        successes[0] += 1

    calls.start()
    seen = []
    for ended in range(12):
        room = min(1 + ended, 11)
        expected = min(room, 12 - ended)  # all the room, once enough have ended to have room
        # Once the ended calls have left, those still waiting fill the room, no more.
        assert wait_until(lambda: calls.left == ended and admission.in_flight("client") == expected, 2), (
            ended, admission.in_flight("client"))
        seen.append(admission.in_flight("client"))
        assert admission.in_flight("client") <= room
        calls.end_one(succeed)
    calls.join()
    assert seen == [1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1]
    assert sorted(calls.entered) == list(range(12)) and not calls.refused
    assert admission.in_flight("client") == 0 and admission.waiting("client") == 0


def test_a_call_that_ends_without_success_gives_one_turn():
    """Room that does not grow: each call that ends lets one waiter go, in arrival order."""
    admission = Admission()
    calls = Calls(admission, lambda: 2, 6)
    calls.start()
    assert wait_until(lambda: admission.in_flight("client") == 2 and admission.waiting("client") == 4)
    for ended in range(1, 5):
        calls.end_one()
        assert wait_until(lambda: calls.left == ended and len(calls.entered) == 2 + ended)
        assert admission.in_flight("client") == 2 and admission.waiting("client") == 4 - ended
    assert sorted(calls.entered[:2]) == [0, 1] and calls.entered[2:] == [2, 3, 4, 5]
    calls.end_one()
    calls.end_one()
    calls.join()


def test_requests_waiting_for_a_turn_are_served_first_come_first_served():
    """Past its room, a client's requests queue; each call that ends hands the first one its turn,
    and a request that arrives later does not pass them (once, it could wait out SPOTIFY_TIMEOUT)."""
    admission = Admission()
    calls = Calls(admission, lambda: 1, 6)
    calls.start()
    for _ in range(6):
        calls.end_one()
    calls.join()
    assert calls.entered == list(range(6))
    assert admission.waiting("client") == 0


def test_no_room_by_the_deadline_is_false_and_leaves_the_queue():
    clock = [100.0]
    admission = Admission(clock=lambda: clock[0])
    assert admission.enter("client", lambda: 1, deadline=101.0)
    clock[0] = 101.0  # the deadline has passed by the time the second one asks
    assert not admission.enter("client", lambda: 1, deadline=101.0)
    assert admission.waiting("client") == 0 and admission.in_flight("client") == 1
    admission.leave("client")
    assert admission.in_flight("client") == 0


def test_a_refusal_from_room_passes_through_and_hands_on_the_turn():
    admission = Admission()
    refuse = threading.Event()

    def room() -> int:
        if refuse.is_set():
            raise LookupError("budget spent")
        return 1

    assert admission.enter("client", room, time.monotonic() + 30)
    outcomes: dict[int, object] = {}

    def waiter(n: int) -> None:
        try:
            outcomes[n] = admission.enter("client", room, time.monotonic() + 30)
        except LookupError as err:
            outcomes[n] = err

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(3)]
    for n, thread in enumerate(threads):
        thread.start()
        assert wait_until(lambda: admission.waiting("client") == n + 1)
    refuse.set()
    admission.leave("client")  # the first waiter is refused, and hands the turn to the next, and so on
    for thread in threads:
        thread.join(10)
    assert all(isinstance(outcome, LookupError) for outcome in outcomes.values()) and len(outcomes) == 3
    assert admission.waiting("client") == 0 and admission.in_flight("client") == 0


def test_sure_room_admits_without_asking():
    admission = Admission()

    def room() -> int:
        raise AssertionError("asked")

    for _ in range(3):
        assert admission.enter("client", room, time.monotonic() + 1, sure_room=3)
    with pytest.raises(AssertionError):
        admission.enter("client", room, time.monotonic() + 1, sure_room=3)
    assert admission.in_flight("client") == 3


def test_other_keys_are_not_held_back():
    admission = Admission()
    assert admission.enter("busy", lambda: 1, time.monotonic() + 1)
    assert admission.enter("other", lambda: 1, time.monotonic() + 1)
    assert admission.in_flight("busy") == admission.in_flight("other") == 1


def test_successes_count_over_the_current_and_the_previous_window():
    """A busy address keeps its earned room across a window's end instead of losing it all at once."""
    now = [1000.0]
    count = WindowCount(60, clock=lambda: now[0])
    for _ in range(3):
        count.add("203.0.113.7")
    now[0] += 61  # the next window: the three are the previous one's
    count.add("203.0.113.7")
    assert count.get("203.0.113.7") == 4
    assert count.get("198.51.100.1") == 0
    now[0] += 60  # one more: only the single success of the last window remains
    assert count.get("203.0.113.7") == 1
    now[0] += 200  # long idle: nothing is "previous" any more
    assert count.get("203.0.113.7") == 0


def test_window_counts_from_many_threads_lose_none():
    count = WindowCount(3600)

    def add() -> None:
        for _ in range(2000):
            count.add("k")

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert count.get("k") == 16000

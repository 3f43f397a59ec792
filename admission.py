"""Admission of concurrent calls per client: how many may be in flight, and whose turn is next.

What no rate-limit library does: a call's outcome (success or failure) is unknown until it ends, so
each client may have only so many calls in flight at once, and the rest wait, first come first
served. The room a client has is the caller's to say (`room`); this module only keeps the calls in
flight and the queue, every count under one lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable


class Admission:
    """Calls in flight per key, and the requests waiting for room, in arrival order.

    A call that ends hands the turn to the first waiter of its key; a waiter that gets in and
    still sees room left hands the turn on to the next, so the calls at once grow as the room does.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        # Requests waiting for room, in order: each call that ends wakes the first of its own
        # key's, not all of everyone's.
        self._queues: dict[str, deque[threading.Event]] = {}

    def in_flight(self, key: str) -> int:
        """How many calls of this key are in flight."""
        with self._lock:
            return self._in_flight[key]

    def waiting(self, key: str) -> int:
        """How many requests of this key wait for room."""
        with self._lock:
            return len(self._queues.get(key, ()))

    def enter(self, key: str, room: Callable[[], int], deadline: float, sure_room: int = 0) -> bool:
        """Count one more call of this key in flight once it has room; False if none came by deadline.

        `room()` says how many calls of the key may be in flight now; it may raise to refuse the
        request outright (the exception passes through, and a turn taken is handed on).
        `sure_room` is room known without asking `room()`: while nobody waits and fewer calls
        than that are in flight, the call goes at once.
        """
        with self._lock:
            if key not in self._queues and self._in_flight[key] < sure_room:
                self._in_flight[key] += 1
                return True
        woken = False  # first in its key's queue: a call ended and handed this request its turn
        try:
            while True:
                calls = room()
                with self._lock:
                    in_flight = self._in_flight[key]
                    # First come, first served: a new request does not pass those already waiting.
                    if (woken or key not in self._queues) and in_flight < calls:
                        self._in_flight[key] = in_flight + 1
                        if woken and in_flight + 1 < calls:
                            self._wake_next(key)  # room for more: pass the turn on
                        return True
                    left = deadline - self._clock()
                    if left <= 0:
                        if woken:
                            self._wake_next(key)
                        return False
                    turn = threading.Event()
                    queue = self._queues.setdefault(key, deque())
                    if woken:  # it keeps its place at the head
                        queue.appendleft(turn)
                    else:
                        queue.append(turn)
                woken = turn.wait(left)
                if not woken:
                    with self._lock:
                        woken = turn.is_set()  # handed its turn just as its wait ran out
                        if not woken:
                            self._leave_queue(key, turn)
        except BaseException:  # room() refused, or the greenlet was killed while it asked
            if woken:  # a turn this request does not take: hand it on
                with self._lock:
                    self._wake_next(key)
            raise

    def leave(self, key: str) -> None:
        """One call of this key entered earlier is over: the first waiter gets its turn."""
        with self._lock:
            left = self._in_flight[key] - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
            self._wake_next(key)

    def _leave_queue(self, key: str, turn: threading.Event) -> None:
        queue = self._queues.get(key)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._queues[key]

    def _wake_next(self, key: str) -> None:
        queue = self._queues.get(key)
        if queue:
            queue.popleft().set()
            if not queue:
                del self._queues[key]


class WindowCount:
    """Counts per key over the current window of `seconds` and the one before it.

    Keeping the previous window means no key's count drops to zero at a window's end, when a
    busy address would otherwise lose its room all at once.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._ends = 0.0
        self._counts: Counter[str] = Counter()
        self._previous: Counter[str] = Counter()

    def _roll(self) -> None:
        now = self._clock()
        if now >= self._ends:
            # Only a window that has just ended counts as the previous one.
            self._previous = self._counts if now < self._ends + self._seconds else Counter()
            self._counts = Counter()
            self._ends = now + self._seconds

    def add(self, key: str) -> None:
        """Count one for this key."""
        with self._lock:
            self._roll()
            self._counts[key] += 1

    def get(self, key: str) -> int:
        """This key's count over the current and the previous window."""
        with self._lock:
            self._roll()
            return self._counts[key] + self._previous[key]

"""Progress of a long run on stderr: what is being timed, how far the run is, and the time left,
estimated from the pace so far."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """`total` units of work; show() prints one line, advance() marks a unit done."""

    def __init__(self, total: int, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if total < 1:
            raise ValueError(f"total={total} units of work: there must be at least one")
        self.total, self.done = total, 0
        self.stream = stream
        self.clock = clock
        self.start = clock()

    def show(self, what: str) -> None:
        elapsed = self.clock() - self.start
        left = f"about {_duration(elapsed / self.done * (self.total - self.done))} left" if self.done else "time left: after the first step"
        line = f"[{self.done}/{self.total}] {what} · {_duration(elapsed)} elapsed, {left}"
        print(line, file=self.stream or sys.stderr, flush=True)

    def advance(self) -> None:
        self.done = min(self.total, self.done + 1)

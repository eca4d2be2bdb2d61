"""A text progress bar for simulation runs (stderr; no dependency): simulated seconds
done out of the run's span, and how much faster than real time the run goes. On a
terminal it is redrawn in place; otherwise (a log file) only the final line is written."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    width = 30

    def __init__(
        self, label: str, total_s: float, stream: TextIO | None = None, every_s: float = 0.25
    ) -> None:
        self.label = label
        self.total_s = max(total_s, 1e-9)
        self.stream = stream or sys.stderr
        self.every_s = every_s  # redraw at most this often (wall seconds)
        self.start = time.perf_counter()
        self._drawn = -float("inf")
        self._done_s = 0.0
        self.live = self.stream.isatty()  # redrawn in place; else one line at the end

    def __call__(self, now: float) -> None:
        """The simulated clock reached `now`."""
        self._done_s = min(now, self.total_s)
        wall = time.perf_counter()
        if self.live and wall - self._drawn >= self.every_s:
            self._drawn = wall
            self._draw(wall - self.start)

    def close(self) -> None:
        self._draw(time.perf_counter() - self.start)
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, wall_s: float) -> None:
        fraction = self._done_s / self.total_s
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        speed = f"{self._done_s / wall_s:,.0f}x real time" if wall_s > 0 else ""
        line = (
            f"\r{self.label} [{bar}] {fraction:4.0%} {self._done_s:,.0f}/{self.total_s:,.0f} "
            f"sim-s, {wall_s:.1f} s wall, {speed}"
        )
        self.stream.write(line)
        self.stream.flush()

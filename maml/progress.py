"""How a training run shows its progress: a bar in a terminal, a line now and then in a log.

In a terminal, a tqdm bar counts iterations, or, when the run has a time limit (`--minutes`),
seconds toward that limit (with the iteration in its text): a bar toward 60000 iterations with a
333-hour estimate says nothing about a 4-minute run. Outside a terminal (a log file, CI, a
scheduler) a redrawn bar writes kilobytes of carriage returns, so a plain line is printed every
`LINE_EVERY_S` seconds instead, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LINE_EVERY_S = 30.0
"""Seconds between progress lines outside a terminal."""


def _shown(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class Progress:
    """Progress of iterations `start..total`, toward `limit_s` seconds of this call if given."""

    def __init__(self, start: int, total: int, limit_s: float | None = None, enabled: bool = True,
                 stream: TextIO | None = None, every_s: float = LINE_EVERY_S) -> None:
        self.stream = stream or sys.stderr
        self.total, self.limit_s, self.every_s = total, limit_s, every_s
        self.enabled = enabled
        self.t0 = self.last_line = time.perf_counter()
        self.iteration, self.metrics = start, {}
        self.terminal = enabled and self.stream.isatty()
        self.bar = None
        if self.terminal:
            if limit_s is None:
                self.bar = tqdm(total=total, initial=start, desc="meta-train", dynamic_ncols=True,
                                file=self.stream)
            else:
                self.bar = tqdm(total=round(limit_s), desc="meta-train", unit="s",
                                dynamic_ncols=True, file=self.stream,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s "
                                           "[{postfix}]")
                self.bar.set_postfix_str(self._iterations())

    def _iterations(self) -> str:
        return f"iteration {self.iteration}/{self.total}"

    def update(self, iteration: int, metrics: dict[str, float] | None = None) -> None:
        """Iteration `iteration` is done; `metrics` (when logged) are the latest to show."""
        self.iteration = iteration
        if metrics:
            self.metrics = metrics
        now = time.perf_counter()
        if self.bar is not None:
            if self.limit_s is None:
                self.bar.update(iteration - self.bar.n)
                if metrics:
                    self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
            else:
                self.bar.update(min(round(now - self.t0), self.bar.total) - self.bar.n)
                self.bar.set_postfix_str(", ".join(filter(None, [self._iterations(),
                                                                 _shown(self.metrics)])))
        elif self.enabled and now - self.last_line >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last_line = now
        limit = "" if self.limit_s is None else f" of {self.limit_s:.0f}"
        metrics = f"; {_shown(self.metrics)}" if self.metrics else ""
        print(f"meta-train: {self._iterations()}, {now - self.t0:.0f}{limit} s{metrics}",
              file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message that must not be torn by the bar."""
        if self.bar is not None:
            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(time.perf_counter())

"""Progress lines with an ETA for the driver's long loops (pruning's gradient passes, layer scoring).

``Progress(logger, "layer scores (mutual information)", total)``; call ``.step()`` once per item (a
calibration sequence, a layer). A line goes to the log at most every ``every_s`` seconds and once at the end
(``layer scores (mutual information): 12/64 calibration sequences, 41 s, ETA 2.9 min``), so a 7B run shows
it is alive and how long is left, while a small one logs one line.
"""

from __future__ import annotations

import logging
import time

EVERY_S = 15.0


class Progress:
    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str = "calibration sequences",
                 every_s: float = EVERY_S):
        self.logger, self.what, self.total, self.unit, self.every_s = logger, what, max(1, int(total)), unit, every_s
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.t0
        text = f"{self.what}: {min(self.done, self.total)}/{self.total} {self.unit}, {elapsed:.0f} s"
        if 0 < self.done < self.total:
            text += f", ETA {elapsed / self.done * (self.total - self.done) / 60:.1f} min"
        return text

"""A line every so often while a long pass runs: tokens done, rate, time left (a 12-minute dump says so)."""
import logging
import time
from typing import Dict

from .base import Component, Step

logger = logging.getLogger(__name__)


class Progress(Component):
    def __init__(self, what: str, total: int, interval: float = 30.0):
        self.what, self.total, self.interval = what, max(total, 1), interval
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started

    def on_scores(self, step: Step) -> None:
        self.done += step.rows.numel()
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            logger.info(f"{self.what}: {self.done:,} of ~{self.total:,} tokens ({self.done / self.total:.0%}), "
                        f"{rate:,.0f} tokens/s, about {left / 60:.1f} min left")

    def close(self) -> Dict:
        seconds = time.perf_counter() - self.started
        return {"rows": self.done, "seconds": round(seconds, 3), "tokens_per_s": round(self.done / max(seconds, 1e-9))}

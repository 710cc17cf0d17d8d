"""Counting unusable samples: each skip is logged and counted per reason, and past the allowed rate the run
stops with a DataError instead of training on whatever is left."""

from __future__ import annotations

import logging

from editflow.errors import DataError

log = logging.getLogger(__name__)
MIN_SEEN = 200  # samples read before the rate is judged, so that one early bad sample does not stop a run


class SkipCounter:
    """`seen` samples, `counts` of skips per reason; `skip` raises once skips exceed `max_rate` of what was
    seen (judged only after `min_seen` samples, default MIN_SEEN)."""

    def __init__(self, max_rate: float, min_seen: int | None = None, what: str = "samples read by this process"):
        self.max_rate, self.what = max_rate, what
        self.min_seen = MIN_SEEN if min_seen is None else min_seen
        self.seen = 0
        self.counts: dict[str, int] = {}

    def skip(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        total = sum(self.counts.values())
        log.warning("skipping (%d skipped so far): %s", total, message)
        if self.seen >= self.min_seen and total / self.seen > self.max_rate:
            raise DataError(f"{total} of {self.seen} {self.what} failed ({self.counts}), over "
                            f"data.max_skip_rate={self.max_rate:.1%}; last: {message}. Check the shards with "
                            "`editflow data verify DIR`, fix or leave out the bad ones, or raise data.max_skip_rate")

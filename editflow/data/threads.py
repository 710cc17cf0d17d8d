"""Decoding in threads: how many CPUs this process may use, and a `map` over an endless stream run in threads
with the results kept in order."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int) -> Iterator[R]:
    """`map(fn, items)` with `fn` run in `threads` threads on at most `ahead` items read and not yet yielded.

    The results come in the order of `items`, whichever thread finishes first, and `items` is only ever
    advanced in the caller's thread (it need not be thread-safe). An exception raised by `items` comes after
    the results of the items before it, as it would from `map`; one raised by `fn` comes with its item's
    result. (`Executor.map` before Python 3.14 reads all of `items` first, so it cannot take an endless
    stream.) Closing the generator cancels what has not started and waits for what has."""
    source, failure, exhausted = iter(items), None, False
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="editflow-decode")
    try:
        while True:
            while not exhausted and len(pending) < max(ahead, 1):
                try:
                    pending.append(pool.submit(fn, next(source)))
                except StopIteration:
                    exhausted = True
                except Exception as err:  # noqa: BLE001 - re-raised below, after the results read before it
                    exhausted, failure = True, err
            if not pending:
                break
            yield pending.popleft().result()
        if failure is not None:
            raise failure
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

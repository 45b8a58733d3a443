"""Process-wide worker threads for compiled kernels (numba, nogil) and the two ways work is spread over them."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_CORES = os.cpu_count() or 1  # once: os.cpu_count() reads /sys at every call
_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def pool(name: str) -> ThreadPoolExecutor:
    """Process-wide worker threads for compiled kernels (which release the GIL), one pool per purpose
    ("build", "search"), each as large as the machine: a long build never queues searches behind it."""
    with _POOLS_LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix=f"kvd-{name}")
        return _POOLS[name]


def run_ranges(fn: Callable[[int, int], object], total: int, parts: int, purpose: str = "build") -> list[object]:
    """fn(lo, hi) over `parts` contiguous ranges of 0..total-1 in the `purpose` pool; returns the results."""
    parts = max(1, min(parts, total))
    if parts == 1:
        return [fn(0, total)]
    bounds = [total * i // parts for i in range(parts + 1)]
    futures = [pool(purpose).submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    first = fn(bounds[0], bounds[1])  # the caller works too instead of waiting idle
    return [first] + [f.result() for f in futures]


def run_claimed(fn: Callable[[int, int], object], total: int, workers: int, purpose: str = "search",
                chunks: int | None = None) -> None:
    """fn(lo, hi) over `chunks` contiguous ranges of 0..total-1 (default: one item each), claimed one at a time
    by `workers` threads of the `purpose` pool (the caller is one of them): a worker that the OS delays does
    fewer ranges instead of holding up a fixed share, as a static split does when another process keeps a core
    busy. With one worker, fn(0, total) runs on the caller."""
    chunks = max(1, min(total if chunks is None else chunks, total))
    workers = max(1, min(workers, chunks, _CORES))
    if workers == 1:
        fn(0, total)
        return
    bounds = [total * i // chunks for i in range(chunks + 1)]
    claim = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (i := next(claim)) < chunks:
            fn(bounds[i], bounds[i + 1])

    futures = [pool(purpose).submit(work) for _ in range(workers - 1)]
    work()
    for future in futures:
        # a helper that has not started yet would find nothing left: withdraw it instead of waiting for it
        if not future.cancel():
            future.result()

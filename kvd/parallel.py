"""Per-call parallelism of the retrieval kernels: one numba parallel region (OpenMP threads) instead of the
worker pool's hand-offs (kvd.workers), where the host allows it.

Why: a decode Retrieve spreads 32 query heads' searches over the cores and must return in about a
millisecond. Through the worker pool every call woke up to 15 Python threads, and each of them took the GIL to
claim its next head: on the 16-core H100 host the graph search of a 128K-token layer took 2.36 ms on 16 threads
against 0.99 ms as one parallel region (16.9 ms on one thread; `bench/dispatch_bench.py`). OpenMP's threads
wait for the next region by spinning briefly, never touch the GIL, and the calling thread works as one of them.

Only a thread-safe threading layer is used (OpenMP, or TBB): the daemon starts regions from several threads at
once, which numba's own `workqueue` layer does not survive. Without one, or with KVD_PARALLEL=0, the kernels
run on the worker pool as before (same results: every head is computed the same way either way).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numba

_LAYERS = ("omp", "tbb")


def _available_layer() -> str | None:
    if os.environ.get("KVD_PARALLEL", "1") == "0":
        return None
    for name in _LAYERS:
        try:
            if name == "omp":
                from numba.np.ufunc import omppool  # noqa: F401  (imports only where libgomp loads)
            else:
                from numba.np.ufunc import tbbpool  # noqa: F401
        except ImportError:
            continue
        return name
    return None


# once: os.cpu_count() reads /sys at every call, which is slow in some sandboxes, and every Retrieve sizes its
# parallel work by it
CORES = os.cpu_count() or 1
LAYER = _available_layer()
if LAYER is not None and os.environ.get("NUMBA_THREADING_LAYER") is None:
    numba.config.THREADING_LAYER = LAYER
ENABLED = LAYER is not None
_LOCAL = threading.local()


def enabled() -> bool:
    """Whether retrieval kernels run as parallel regions (tests switch this off to compare both paths)."""
    return ENABLED


def threads(requested: int = 0, chunk: int = 1, limit: int = 0) -> int:
    """Set this thread's parallel-region size (numba's setting is per calling thread) and return it:
    `requested`, or one per core, at most `limit` (the region's tasks, when given) and numba's pool. Iterations
    are claimed `chunk` at a time (dynamic schedule: their costs differ)."""
    wanted = requested or limit or CORES
    if limit:
        wanted = min(wanted, limit)
    wanted = min(wanted, numba.config.NUMBA_NUM_THREADS)
    if getattr(_LOCAL, "threads", None) != (wanted, chunk):
        numba.set_num_threads(wanted)
        numba.set_parallel_chunksize(chunk)
        _LOCAL.threads = (wanted, chunk)
    return wanted


def region_team() -> int:
    """Threads of this process's parallel regions at most (numba's pool: `server.region_threads` in the
    daemon); 0 when the kernels run on the worker pool instead."""
    return int(numba.config.NUMBA_NUM_THREADS) if ENABLED else 0


@contextmanager
def timed() -> Iterator[None]:
    """Time one parallel region on this thread (added up until `take_seconds`): the compiled kernel alone,
    without the Python around it, e.g. RetrieveResponse.search_kernel_ms."""
    started = time.perf_counter()
    try:
        yield
    finally:
        _LOCAL.region_s = getattr(_LOCAL, "region_s", 0.0) + time.perf_counter() - started


def take_seconds() -> float:
    """Seconds this thread spent in `timed` regions since the last call."""
    seconds = getattr(_LOCAL, "region_s", 0.0)
    _LOCAL.region_s = 0.0
    return seconds

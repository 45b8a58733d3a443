"""How many threads the daemon's parallel regions get by default (read before numba is imported: numba sizes
its OpenMP pool once, from NUMBA_NUM_THREADS, when it is first imported).

Why not one per core: between regions OpenMP's threads wait by spinning for milliseconds, so a pool of one
thread per core keeps every core busy through a decode step. The model's process beside the daemon (a GPU decode
loop's Python thread launching kernels) and the daemon's own Python thread then share cores with spinning
threads. On the 16-core H100 host a decode at 128K took 129.7 ms/token with 15 region threads against 157.5
with 16 in back-to-back runs (BENCHMARKS.md, "Seventh session"). Hosts with few cores keep every core: there a
region thread less costs more than it frees.
"""

from __future__ import annotations

# from this many cores on, one is left to the processes beside the daemon
_RESERVE_FROM_CORES = 8


def region_threads(cores: int) -> int:
    """The default size of the retrieval kernels' parallel regions on a host with `cores` cores."""
    return cores - 1 if cores >= _RESERVE_FROM_CORES else max(1, cores)

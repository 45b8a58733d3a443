"""Launch-ahead decode: the model's thread launches the rest of a layer while kvd searches.

Without it, each layer's Retrieve blocks the thread that launches the model's kernels, so per token the 32 calls
and the model's own Python run one after the other. With it, the thread sends the run (PreparedRetrieve.start),
queues on the CUDA stream a wait on the plan's signal word, the copies of the results and the merge, and goes on
with the layer's projections and MLP and the next layer's start; the daemon stores the word once the results are
in the plan's shared memory, and the device then proceeds. The reply itself is read at the next layer
(PreparedRetrieve.finish), where an error still stops the forward.

The wait is the driver's stream memory operation (cuStreamWaitValue32) on the plan's region, which is page-locked
and mapped for the device (cudaHostRegister); the same registration makes the query's device-to-host copy and the
results' copies asynchronous. Needs a CUDA device whose driver offers stream memory operations, and a plan with a
shared-memory region and a fast lane; otherwise the blocking path runs.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch

_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*word - value) >= 0, so a wrapping counter works


class StreamWaiter:
    """What launch-ahead needs from the device: page-locking a plan's region, a stream wait on a word of it
    (cuStreamWaitValue32, from the driver library), events and the current stream. Tests swap in a host stand-in
    with the same methods."""

    def __init__(self) -> None:
        driver = ctypes.CDLL("libcuda.so.1")
        wait = getattr(driver, "cuStreamWaitValue32_v2", None) or driver.cuStreamWaitValue32
        wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        wait.restype = ctypes.c_int
        device_pointer = driver.cuMemHostGetDevicePointer_v2
        device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        device_pointer.restype = ctypes.c_int
        self._wait, self._device_pointer = wait, device_pointer

    def register(self, address: int, size: int) -> int:
        """Page-lock [address, address + size) for the device; returns the device address of `address`."""
        if (code := int(torch.cuda.cudart().cudaHostRegister(address, size, 0))) != 0:
            raise RuntimeError(f"cudaHostRegister of a plan's region failed (cudaError {code})")
        device_address = ctypes.c_uint64()
        if (code := self._device_pointer(ctypes.byref(device_address), ctypes.c_void_p(address), 0)) != 0:
            torch.cuda.cudart().cudaHostUnregister(address)
            raise RuntimeError(f"cuMemHostGetDevicePointer failed (CUresult {code})")
        return device_address.value

    def unregister(self, address: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(address)

    def wait(self, stream: Any, device_address: int, value: int) -> None:
        """Make `stream` wait until the uint32 at `device_address` has reached `value`."""
        if (code := self._wait(ctypes.c_void_p(stream.cuda_stream), device_address, value, _WAIT_GEQ)) != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed (CUresult {code})")

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def event(self) -> Any:
        return torch.cuda.Event()

    def synchronize(self) -> None:
        torch.cuda.synchronize()


@functools.cache  # asked at every decode Retrieve; os.cpu_count() reads /sys each time (~30 us in some sandboxes)
def ahead_threads() -> int:
    """The daemon's region threads for launch-ahead runs, unless the search params name them: one per core but
    one. The model's thread now runs while kvd searches, and a region whose threads share a core with it waits for
    its slowest thread (H100 host, 128K: 76-78 ms/token with 15 threads, 115-128 with 16; BENCHMARKS.md). The fast
    lane means the daemon runs on this host; like the daemon's own default (kvd.parallel.CORES), this counts the
    host's cores, not this process's affinity (a client pinned to one core must not shrink the daemon's regions)."""
    return max(1, (os.cpu_count() or 2) - 1)


@functools.cache
def stream_waiter() -> StreamWaiter | None:
    """The driver's stream wait, or None where there is none (no CUDA, no driver library, an old driver)."""
    if not torch.cuda.is_available():
        return None
    try:
        return StreamWaiter()
    except (OSError, AttributeError):
        return None


class RegisteredPlan:
    """A prepared plan whose shared-memory region is registered for the device (StreamWaiter.register): its slots
    copy to the device asynchronously and a stream can wait on its signal word."""

    def __init__(self, plan: Any, waiter: StreamWaiter) -> None:
        memory = plan.shared_memory()
        if memory is None or plan.signal_word() is None:
            raise ValueError("the plan has no shared-memory region")
        self.plan, self.waiter = plan, waiter
        self._bytes: torch.Tensor | None = torch.frombuffer(memory, dtype=torch.uint8)  # the mapping stays
        self.address = self._bytes.data_ptr()
        self.signal_address = waiter.register(self.address, self._bytes.numel()) + plan.signal_offset

    def wait(self, stream: Any, value: int) -> None:
        self.waiter.wait(stream, self.signal_address, value)

    def unregister(self) -> None:
        """Before the plan closes: its region must not be unmapped while registered (the caller has synchronized
        the device, so no copy still reads it)."""
        if self._bytes is not None:
            self._bytes = None
            self.waiter.unregister(self.address)

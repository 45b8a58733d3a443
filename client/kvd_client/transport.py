"""Where a call's tensors travel: inline in the message, or through the client's shared-memory region.

One region per client, registered with the daemon; a call lays its input tensors at the start and asks the
daemon to write the reply's tensors after them. Calls hold the client's lock while they use the region.
"""

from __future__ import annotations

import torch

from kvd.v1 import kvd_pb2 as pb
from kvd_client import wire
from kvd_client.shm import ShmRegion

MIN_REGION_BYTES = 16 << 20


class Placer:
    """Builds the tensors of one call and reads the tensors of its reply."""

    def __init__(self, region: ShmRegion | None, name: str | None) -> None:
        self.region = region
        self.name = name
        self.cursor = 0

    @property
    def shared(self) -> bool:
        return self.region is not None

    def tensor(self, tensor: torch.Tensor) -> pb.Tensor:
        tensor = wire.as_torch(tensor).contiguous()
        if self.region is None:
            return wire.encode_inline(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        start = wire.align(self.cursor)
        wire.place(tensor, self.region.buffer, start)
        self.cursor = start + nbytes
        return pb.Tensor(dtype=wire.WIRE_BY_TORCH[tensor.dtype], shape=list(tensor.shape),
                         shm=pb.SharedMemoryRef(region=self.name, offset=start, byte_size=nbytes))

    def output_ref(self) -> pb.SharedMemoryRef | None:
        if self.region is None:
            return None
        start = wire.align(self.cursor)
        return pb.SharedMemoryRef(region=self.name, offset=start, byte_size=self.region.size - start)

    def read(self, message: pb.Tensor) -> torch.Tensor | None:
        """An owned tensor for a reply tensor (copied out of the region, which the next call reuses)."""
        which = message.WhichOneof("data")
        if which is None and not message.shape:
            return None
        if which == "shm":
            return self.view(message).clone()
        dtype, shape = wire.describe(message)
        return wire.decode_bytes(bytearray(message.inline), dtype, shape)

    def view(self, message: pb.Tensor) -> torch.Tensor:
        """A reply tensor in this region, as a view (valid until the region is rewritten)."""
        if self.region is None or message.shm.region != self.name:
            raise RuntimeError(f"reply refers to unknown shared-memory region {message.shm.region!r}")
        dtype, shape = wire.describe(message)
        ref = message.shm
        return wire.decode_bytes(self.region.buffer[ref.offset: ref.offset + ref.byte_size], dtype, shape)


class Transport:
    def __init__(self, mode: bool | str, max_region_bytes: int) -> None:
        if mode not in (True, False, "auto"):
            raise ValueError("shm must be True, False or 'auto'")
        self.mode = mode
        self.enabled = mode is not False
        self.max_region_bytes = max_region_bytes
        self.region: ShmRegion | None = None
        self.name: str | None = None

    def wanted_region(self, needed: int) -> ShmRegion | None:
        """A new region to register when the current one cannot hold `needed` bytes (None: keep it)."""
        if not self.enabled or needed > self.max_region_bytes:
            return None
        if self.region is not None and self.region.size >= needed:
            return None
        size = MIN_REGION_BYTES
        while size < needed:
            size *= 2
        return ShmRegion.create(min(size, self.max_region_bytes))

    def adopt(self, region: ShmRegion) -> ShmRegion | None:
        """Make `region` current; returns the previous one for the caller to unregister and close."""
        previous = self.region
        self.region, self.name = region, region.key
        return previous

    def disable(self) -> None:
        self.enabled = False

    def placer(self, needed: int) -> Placer:
        if self.region is not None and self.region.size >= needed:
            return Placer(self.region, self.name)
        return Placer(None, None)

    def close(self) -> ShmRegion | None:
        region, self.region, self.name = self.region, None, None
        return region

"""Registered shared-memory regions (daemon side): registration by name, bounds checks, tensor views."""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from dataclasses import dataclass

import torch
from kvd_client import wire
from kvd_client.shm import ShmRegion, validate_key

from kvd.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted


@dataclass
class Registration:
    name: str
    key: str
    offset: int
    byte_size: int
    region: ShmRegion
    tenant: str


# Regions created by kvd_client are named kvd-<pid>-<random>: the daemon can tell when their creator is gone.
_CLIENT_KEY = re.compile(r"^kvd-(\d+)-[0-9a-f]+$")


def _owner_gone(key: str) -> bool:
    """True when the region's object was unlinked, or its creating client process no longer exists."""
    if not os.path.exists(f"/dev/shm/{key}"):
        return True
    match = _CLIENT_KEY.match(key)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class SharedMemoryRegistry:
    def __init__(self, max_regions: int = 1024, max_region_bytes: int = 1 << 40) -> None:
        self._regions: dict[tuple[str, str], Registration] = {}
        self._lock = threading.Lock()
        self.max_regions = max_regions
        self.max_region_bytes = max_region_bytes

    def register(self, tenant: str, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name or len(name) > 200:
            raise InvalidArgument("shared-memory registration name must be 1-200 characters")
        try:
            validate_key(key)
        except ValueError as exc:
            raise InvalidArgument(f"invalid shared-memory key: {exc}") from None
        if byte_size == 0:
            raise InvalidArgument("shared-memory byte_size must be positive")
        if offset + byte_size > self.max_region_bytes:
            raise InvalidArgument(f"shared-memory region larger than the limit of {self.max_region_bytes} bytes")
        with self._lock:
            if (tenant, name) in self._regions:
                raise AlreadyExists(f"shared-memory region {name!r} is already registered")
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(f"too many shared-memory regions (limit {self.max_regions})")
        try:
            region = ShmRegion.attach(key, offset + byte_size)
        except FileNotFoundError:
            raise NotFound(f"shared-memory object {key!r} does not exist on the daemon's host") from None
        except (ValueError, OSError) as exc:
            raise InvalidArgument(f"cannot map shared-memory object {key!r}: {exc}") from None
        with self._lock:
            if (tenant, name) in self._regions:
                region.close()
                raise AlreadyExists(f"shared-memory region {name!r} is already registered")
            self._regions[(tenant, name)] = Registration(name, key, offset, byte_size, region, tenant)

    def unregister(self, tenant: str, name: str) -> int:
        with self._lock:
            if name:
                found = self._regions.pop((tenant, name), None)
                if found is None:
                    raise NotFound(f"shared-memory region {name!r} is not registered")
                removed = [found]
            else:
                removed = [r for key, r in self._regions.items() if key[0] == tenant]
                for r in removed:
                    del self._regions[(tenant, r.name)]
        for registration in removed:
            registration.region.close()
        return len(removed)

    def status(self, tenant: str, name: str = "") -> list[Registration]:
        with self._lock:
            found = [r for key, r in self._regions.items() if key[0] == tenant and (not name or r.name == name)]
        if name and not found:
            raise NotFound(f"shared-memory region {name!r} is not registered")
        return sorted(found, key=lambda r: r.name)

    def release_abandoned(self) -> list[str]:
        """Unregister regions whose client went away (unlinked object or dead process) and remove the
        objects that a dead client left behind in /dev/shm."""
        with self._lock:
            abandoned = [(key, r) for key, r in self._regions.items() if _owner_gone(r.key)]
            for key, _ in abandoned:
                del self._regions[key]
        for _, registration in abandoned:
            registration.region.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{registration.key}")
        return [r.name for _, r in abandoned]

    def registration(self, tenant: str, name: str) -> Registration | None:
        with self._lock:
            return self._regions.get((tenant, name))

    def holds(self, tenant: str, registration: Registration) -> bool:
        """Whether `registration` is still registered (not unregistered, nor replaced under its name)."""
        with self._lock:
            return self._regions.get((tenant, registration.name)) is registration

    def count(self) -> int:
        with self._lock:
            return len(self._regions)

    def slice(self, tenant: str, region: str, offset: int, byte_size: int) -> memoryview:
        """Bytes [offset, offset + byte_size) of a registered region, bounds-checked."""
        with self._lock:
            registration = self._regions.get((tenant, region))
        if registration is None:
            raise NotFound(f"shared-memory region {region!r} is not registered")
        if offset + byte_size > registration.byte_size:
            raise InvalidArgument(
                f"shared-memory reference [{offset}, {offset + byte_size}) exceeds region {region!r} of "
                f"{registration.byte_size} bytes"
            )
        start = registration.offset + offset
        return registration.region.buffer[start: start + byte_size]

    def close(self) -> None:
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for registration in regions:
            registration.region.close()


class OutputWriter:
    """Places reply tensors one after another inside a shared-memory reference supplied by the request."""

    def __init__(self, registry: SharedMemoryRegistry, tenant: str, region: str, offset: int, byte_size: int):
        self.buffer = registry.slice(tenant, region, offset, byte_size)
        self.region = region
        self.base = offset
        self.byte_size = byte_size
        self.cursor = 0

    def write(self, tensor: torch.Tensor, message: object) -> None:
        tensor = tensor.contiguous()
        self.reserve(tuple(tensor.shape), tensor.dtype, message).copy_(tensor)

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype, message: object) -> torch.Tensor:
        """The next slot of the reference as a writable tensor of `shape`, described in `message`: a reply
        tensor that a kernel writes in place (no copy)."""
        nbytes = math.prod(shape) * dtype.itemsize
        start = wire.align(self.cursor)
        if start + nbytes > self.byte_size:
            raise InvalidArgument(
                f"output shared-memory reference of {self.byte_size} bytes is too small: the reply needs at "
                f"least {start + nbytes} bytes"
            )
        self.cursor = start + nbytes
        message.dtype = wire.WIRE_BY_TORCH[dtype]
        message.shape[:] = list(shape)
        message.shm.region = self.region
        message.shm.offset = self.base + start
        message.shm.byte_size = nbytes
        return wire.decode_bytes(self.buffer[start: start + nbytes], dtype, shape)

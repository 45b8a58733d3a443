"""POSIX shared-memory regions (files under /dev/shm) used as the tensor data plane.

Both sides map the same object with mmap. We avoid multiprocessing.shared_memory on purpose: before Python
3.13 an attaching process registers the segment with the resource tracker, which unlinks it when that
process exits, destroying the creator's region.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def validate_key(key: object) -> str:
    """Check a shared-memory object name and return it: 1..200 characters of [A-Za-z0-9_.-], not starting
    with '.', so it can never name a path ('/', '..', hidden files) or anything outside /dev/shm."""
    if not isinstance(key, str):
        raise ValueError(f"shared-memory region name must be a string, not {type(key).__name__}")
    if not key:
        raise ValueError("shared-memory region name is empty")
    if len(key) > 200:
        raise ValueError(f"shared-memory region name is {len(key)} characters long; the limit is 200")
    if not _KEY_PATTERN.fullmatch(key):
        bad = sorted({c for c in key if not (c.isascii() and (c.isalnum() or c in "_.-"))})
        raise ValueError(f"shared-memory region name {key[:64]!r} contains {''.join(bad)!r}; "
                         "only letters, digits, '_', '.' and '-' are allowed")
    if key.startswith("."):
        raise ValueError(f"shared-memory region name {key[:64]!r} must not start with '.'")
    return key


class ShmRegion:
    """A mapped shared-memory object. Create it (owner, unlinks on close) or attach to an existing one."""

    def __init__(self, key: str, size: int, *, create: bool) -> None:
        self.key = validate_key(key)
        self.path = SHM_DIR / key
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                actual = os.fstat(fd).st_size
                if actual < size:
                    raise ValueError(f"shared-memory object {key!r} has {actual} bytes, fewer than {size}")
            self.size = size
            self.mmap = mmap.mmap(fd, size) if size > 0 else None
        finally:
            os.close(fd)
        self.buffer = memoryview(self.mmap) if self.mmap is not None else memoryview(b"")

    @classmethod
    def create(cls, size: int, prefix: str = "kvd") -> ShmRegion:
        return cls(f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}", size, create=True)

    @classmethod
    def attach(cls, key: str, size: int) -> ShmRegion:
        return cls(key, size, create=False)

    def close(self) -> None:
        if self.mmap is not None:
            self.buffer.release()
            # Tensors may still view the mapping; it is then released when they go away.
            with contextlib.suppress(BufferError):
                self.mmap.close()
            self.mmap = None
        if self.owner:
            self.owner = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> ShmRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Token-prefix lookup: a deterministic chained hash over token ids in fixed chunks.

h_0 = sha256(b"kvd-prefix-v1"), h_i = sha256(h_{i-1} || int64 little-endian bytes of chunk i). Equal hashes at
chunk i mean equal first i*CHUNK tokens (up to sha256 collisions), independent of process, host or restart
(Python's hash() is salted per process and is never used).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch

CHUNK_TOKENS = 256
_SEED = hashlib.sha256(b"kvd-prefix-v1").digest()


def chained_hashes(token_ids: torch.Tensor, limit: int | None = None) -> list[bytes]:
    """Hashes of every complete chunk of token_ids (at most `limit` chunks)."""
    ids = np.ascontiguousarray(token_ids.to(torch.int64).numpy(), dtype="<i8")
    count = len(ids) // CHUNK_TOKENS if limit is None else min(limit, len(ids) // CHUNK_TOKENS)
    hashes, current = [], _SEED
    for i in range(count):
        current = hashlib.sha256(current + ids[i * CHUNK_TOKENS: (i + 1) * CHUNK_TOKENS].tobytes()).digest()
        hashes.append(current)
    return hashes


class PrefixIndex:
    """(tenant, chunk hash) -> session ids whose token ids start with that chain."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, bytes], set[str]] = {}
        self._indexed: dict[tuple[str, str], list[bytes]] = {}
        self._lock = threading.Lock()

    def update(self, tenant: str, session_id: str, token_ids: torch.Tensor) -> None:
        """(Re)index a session's complete chunks; cheap when only new chunks were added."""
        with self._lock:
            have = self._indexed.get((tenant, session_id), [])
        hashes = chained_hashes(token_ids)
        keep = 0
        while keep < min(len(have), len(hashes)) and have[keep] == hashes[keep]:
            keep += 1
        with self._lock:
            for digest in have[keep:]:
                self._discard(tenant, session_id, digest)
            for digest in hashes[keep:]:
                self._owners.setdefault((tenant, digest), set()).add(session_id)
            self._indexed[(tenant, session_id)] = hashes

    def _discard(self, tenant: str, session_id: str, digest: bytes) -> None:
        owners = self._owners.get((tenant, digest))
        if owners is not None:
            owners.discard(session_id)
            if not owners:
                del self._owners[(tenant, digest)]

    def remove(self, tenant: str, session_id: str) -> None:
        with self._lock:
            for digest in self._indexed.pop((tenant, session_id), []):
                self._discard(tenant, session_id, digest)

    def candidates(self, tenant: str, token_ids: torch.Tensor) -> tuple[set[str], int]:
        """Sessions sharing the longest chain of complete chunks with token_ids, and that chain's token count."""
        best: set[str] = set()
        depth = 0
        for i, digest in enumerate(chained_hashes(token_ids)):
            with self._lock:
                owners = set(self._owners.get((tenant, digest), ()))
            if not owners:
                break
            best, depth = owners, (i + 1) * CHUNK_TOKENS
        return best, depth

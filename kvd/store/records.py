"""Self-describing, checksummed records of the disk tier.

Layout (format version 1) inside one LMDB environment:
- DB "meta":     b"format" -> JSON {"format": "kvd-lmdb", "version": 1}
- DB "sessions": <tenant>\\0<session_id> -> JSON manifest (shape, options, state, durable length, chunk list)
- DB "chunks":   <tenant>\\0<session_id>\\0<kind><layer:u32 BE><start:u64 BE> -> framed payload
  kinds: b"kv" K and V bytes of tokens [start, start+n) of a layer; b"ti" token ids; b"ix" an index blob.
A frame is MAGIC(4) | crc32(payload)(4, LE) | length(8, LE) | payload; the crc is verified on every read.
A manifest is written in the same or a later transaction than every chunk it lists, so after a crash a
manifest never names a missing chunk; chunks no manifest names are leftovers of an interrupted write and are
removed at startup.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

FORMAT_NAME = "kvd-lmdb"
FORMAT_VERSION = 1
MAGIC = b"KVC1"
_HEADER = struct.Struct("<4sIQ")
KIND_KV, KIND_TOKENS, KIND_INDEX = b"kv", b"ti", b"ix"
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class CorruptRecord(ValueError):
    pass


def frame(payload: bytes | memoryview) -> bytes:
    return _HEADER.pack(MAGIC, zlib.crc32(payload), len(payload)) + bytes(payload)


def unframe(record: bytes | memoryview, what: str) -> memoryview:
    """The payload of a framed record, after checking magic, length and crc32."""
    view = memoryview(record)
    if len(view) < _HEADER.size:
        raise CorruptRecord(f"{what}: record of {len(view)} bytes is shorter than its header")
    magic, crc, length = _HEADER.unpack(view[: _HEADER.size])
    payload = view[_HEADER.size:]
    if magic != MAGIC:
        raise CorruptRecord(f"{what}: bad magic {magic!r}")
    if length != len(payload):
        raise CorruptRecord(f"{what}: length {len(payload)} differs from the recorded {length}")
    if zlib.crc32(payload) != crc:
        raise CorruptRecord(f"{what}: checksum mismatch")
    return payload


def session_key(tenant: str, session_id: str) -> bytes:
    return tenant.encode() + b"\0" + session_id.encode()


def split_session_key(key: bytes) -> tuple[str, str]:
    tenant, _, session_id = bytes(key).partition(b"\0")
    return tenant.decode(), session_id.decode()


def chunk_key(tenant: str, session_id: str, kind: bytes, layer: int, start: int) -> bytes:
    return session_key(tenant, session_id) + b"\0" + kind + struct.pack(">IQ", layer, start)


def chunk_prefix(tenant: str, session_id: str) -> bytes:
    return session_key(tenant, session_id) + b"\0"


def parse_chunk_key(key: bytes) -> tuple[bytes, bytes, int, int]:
    """-> (session key, kind, layer, start)."""
    key = bytes(key)
    owner, tail = key[:-15], key[-14:]
    layer, start = struct.unpack(">IQ", tail[2:])
    return owner, tail[:2], layer, start


@dataclass
class Chunk:
    start: int
    length: int
    nbytes: int


@dataclass
class Manifest:
    tenant: str
    session_id: str
    shape: dict[str, Any]
    options: dict[str, Any]
    state: str
    durable_tokens: int
    created: float
    last_access: float
    layers: list[list[Chunk]]            # per layer, chunks of K/V in order of position
    tokens: list[Chunk] = field(default_factory=list)
    indexes: dict[str, int] = field(default_factory=dict)   # layer (as text) -> index blob bytes
    damaged_reason: str = ""
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Manifest:
        raw = json.loads(bytes(data))
        if raw.get("version") != FORMAT_VERSION:
            raise CorruptRecord(f"manifest version {raw.get('version')} is not {FORMAT_VERSION}")
        raw["layers"] = [[Chunk(**c) for c in layer] for layer in raw["layers"]]
        raw["tokens"] = [Chunk(**c) for c in raw.get("tokens", [])]
        return cls(**raw)

    @property
    def disk_bytes(self) -> int:
        kv = sum(c.nbytes for layer in self.layers for c in layer)
        return kv + sum(c.nbytes for c in self.tokens) + sum(self.indexes.values())

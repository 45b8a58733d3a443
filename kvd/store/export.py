"""One-file export of a session, integrity-checked on import.

File: b"KVDX" | version u32 | header length u64 | JSON header | records... | sha256 of everything before it.
Each record is a framed payload (kvd.store.records.frame: magic, crc32, length): per layer the K bytes then
the V bytes of all its tokens, then the token ids.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from kvd_client import wire

from kvd.errors import InvalidArgument
from kvd.store import records
from kvd.store.registry import validate_session_id
from kvd.store.session import ModelShape, Session, SessionOptions, State, Tier

MAGIC = b"KVDX"
VERSION = 1
_PREFIX = struct.Struct("<4sIQ")


def pack_session(session: Session) -> bytes:
    shape, options = session.shape, session.options
    header = {
        "session_id": session.session_id, "created": session.created, "state": session.state.value,
        "shape": {"num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
                  "num_query_heads": shape.num_query_heads, "head_dim": shape.head_dim,
                  "dtype": records.DTYPE_NAMES[shape.dtype]},
        "options": {"index_kind": options.index_kind, "index_params": options.index_params,
                    "pinned": options.pinned, "ttl_seconds": options.ttl_seconds,
                    "sink_tokens": options.sink_tokens, "window_tokens": options.window_tokens,
                    "labels": options.labels},
        "layer_tokens": session.layer_tokens, "token_ids": session.token_ids.length,
    }
    encoded = json.dumps(header).encode()
    parts = [_PREFIX.pack(MAGIC, VERSION, len(encoded)), encoded]
    for layer in session.layers:
        keys, values = layer.view()
        parts.append(records.frame(bytes(wire.tensor_bytes(keys.contiguous()))
                                   + bytes(wire.tensor_bytes(values.contiguous()))))
    parts.append(records.frame(bytes(wire.tensor_bytes(session.token_ids.view().contiguous()))))
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def unpack_session(data: bytes, tenant: str) -> Session:
    if len(data) < _PREFIX.size + 32:
        raise InvalidArgument("export file is truncated")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise InvalidArgument("export file failed its integrity check (sha256 mismatch)")
    magic, version, header_length = _PREFIX.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        raise InvalidArgument(f"not a kvd export of version {VERSION}")
    offset = _PREFIX.size
    header = json.loads(body[offset: offset + header_length])
    offset += header_length
    shape_fields = dict(header["shape"])
    shape_fields["dtype"] = records.DTYPES[shape_fields["dtype"]]
    shape = ModelShape(**shape_fields)
    session = Session(validate_session_id(header["session_id"]), tenant, shape, SessionOptions(**header["options"]))
    session.created = header["created"]
    session.state = State(header["state"]) if header["state"] != State.DAMAGED.value else State.OPEN
    session.tier = Tier.MEMORY
    view = memoryview(body)
    for number, layer in enumerate(session.layers):
        payload, offset = _next_record(view, offset, f"layer {number}")
        length = header["layer_tokens"][number]
        dims = (shape.num_kv_heads, length, shape.head_dim)
        half = len(payload) // 2
        if half != wire.byte_size(dims, shape.dtype):
            raise InvalidArgument(f"export file: layer {number} holds {half} bytes, its header says {length} tokens")
        layer.load(wire.decode_bytes(bytearray(payload[:half]), shape.dtype, dims),
                   wire.decode_bytes(bytearray(payload[half:]), shape.dtype, dims))
    payload, offset = _next_record(view, offset, "token ids")
    session.token_ids.load(wire.decode_bytes(bytearray(payload), torch.int64, (len(payload) // 8,)))
    return session


def _next_record(view: memoryview, offset: int, what: str) -> tuple[memoryview, int]:
    header = struct.Struct("<4sIQ")
    if offset + header.size > len(view):
        raise InvalidArgument(f"export file is truncated before {what}")
    _, _, length = header.unpack_from(view, offset)
    end = offset + header.size + length
    try:
        return records.unframe(view[offset:end], f"export file {what}"), end
    except records.CorruptRecord as exc:
        raise InvalidArgument(str(exc)) from None

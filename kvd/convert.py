"""Conversions between kvd.v1 messages and the daemon's own types."""

from __future__ import annotations

import warnings

import torch
from kvd_client import wire

from kvd.errors import InvalidArgument
from kvd.shm import OutputWriter, SharedMemoryRegistry
from kvd.store.session import ModelShape, Session, SessionOptions, State, Tier
from kvd.v1 import kvd_pb2 as pb

# torch.frombuffer over immutable request bytes warns once per call; the daemon never writes to those views.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

INDEX_KIND_NAMES = {pb.FLAT: "flat", pb.HNSW: "hnsw", pb.GRAPH: "graph", pb.WAVE: "wave",
                    pb.INDEX_KIND_UNSPECIFIED: ""}
INDEX_KIND_WIRE = {v: k for k, v in INDEX_KIND_NAMES.items() if v}
SERVED_BY_WIRE = {**INDEX_KIND_WIRE, "candidates": pb.CANDIDATES}  # what served a Retrieve (reply only)
STATE_WIRE = {State.OPEN: pb.OPEN, State.SEALED: pb.SEALED, State.DAMAGED: pb.DAMAGED}
TIER_WIRE = {Tier.MEMORY: pb.MEMORY, Tier.DISK: pb.DISK}


def shape_from_wire(message: pb.ModelShape) -> ModelShape:
    if message.dtype not in (pb.FLOAT16, pb.BFLOAT16, pb.FLOAT32):
        raise InvalidArgument("model shape dtype must be FLOAT16, BFLOAT16 or FLOAT32")
    return ModelShape(message.num_layers, message.num_kv_heads, message.num_query_heads, message.head_dim,
                      wire.TORCH_BY_WIRE[message.dtype])


def options_from_wire(message: pb.SessionOptions) -> SessionOptions:
    if message.index_kind not in INDEX_KIND_NAMES:
        raise InvalidArgument(f"unknown index kind {message.index_kind}")
    return SessionOptions(index_kind=INDEX_KIND_NAMES[message.index_kind], index_params=dict(message.index_params),
                          pinned=message.pinned, ttl_seconds=message.ttl_seconds, sink_tokens=message.sink_tokens,
                          window_tokens=message.window_tokens, labels=dict(message.labels))


def session_info(session: Session) -> pb.SessionInfo:
    shape, options = session.shape, session.options
    info = pb.SessionInfo(
        session_id=session.session_id,
        shape=pb.ModelShape(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                            num_query_heads=shape.num_query_heads, head_dim=shape.head_dim,
                            dtype=wire.WIRE_BY_TORCH[shape.dtype]),
        options=pb.SessionOptions(index_kind=INDEX_KIND_WIRE.get(options.index_kind, pb.INDEX_KIND_UNSPECIFIED),
                                  index_params=options.index_params, pinned=options.pinned,
                                  ttl_seconds=options.ttl_seconds, sink_tokens=options.sink_tokens,
                                  window_tokens=options.window_tokens, labels=options.labels),
        num_tokens=session.num_tokens, layer_tokens=session.layer_tokens, state=STATE_WIRE[session.state],
        tier=TIER_WIRE[session.tier], durable_tokens=session.durable_tokens, memory_bytes=session.memory_bytes,
        disk_bytes=session.disk_bytes, created_unix=session.created,
        last_access_unix=session.last_access, tenant=session.tenant, has_token_ids=session.token_ids.length > 0,
        promotions=session.promotions,
    )
    for layer, index in enumerate(session.indexes):
        if index is not None:
            info.indexes.append(pb.IndexStatus(layer=layer, kind=INDEX_KIND_WIRE.get(index.kind, pb.FLAT),
                                               ready=index.ready, indexed_tokens=index.indexed_tokens,
                                               bytes=index.nbytes(), from_hints=index.from_hints,
                                               error=index.error))
    return info


class TensorCodec:
    """Reads request tensors (inline or shared memory) and writes reply tensors for one tenant."""

    def __init__(self, shm: SharedMemoryRegistry, tenant: str) -> None:
        self.shm = shm
        self.tenant = tenant

    def read(self, message: pb.Tensor, what: str, required: bool = True) -> torch.Tensor | None:
        which = message.WhichOneof("data")
        if which is None and not message.shape:
            if required:
                raise InvalidArgument(f"{what} is missing")
            return None
        try:
            dtype, shape = wire.describe(message)
        except ValueError as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
        nbytes = wire.byte_size(shape, dtype)
        if which == "shm":
            ref = message.shm
            if ref.byte_size != nbytes:
                raise InvalidArgument(
                    f"{what}: shared-memory byte_size {ref.byte_size} does not match shape {list(shape)} of "
                    f"{str(dtype).removeprefix('torch.')} ({nbytes} bytes)"
                )
            buffer = self.shm.slice(self.tenant, ref.region, ref.offset, ref.byte_size)
        else:
            buffer = message.inline
            if len(buffer) != nbytes:
                raise InvalidArgument(
                    f"{what}: {len(buffer)} bytes given for shape {list(shape)} of "
                    f"{str(dtype).removeprefix('torch.')} ({nbytes} bytes expected)"
                )
        return wire.decode_bytes(buffer, dtype, shape)

    def writer(self, ref: pb.SharedMemoryRef, present: bool) -> OutputWriter | None:
        if not present:
            return None
        return OutputWriter(self.shm, self.tenant, ref.region, ref.offset, ref.byte_size)

    @staticmethod
    def write(writer: OutputWriter | None, tensor: torch.Tensor, message: pb.Tensor) -> None:
        if writer is None:
            message.CopyFrom(wire.encode_inline(tensor))
        else:
            writer.write(tensor, message)

    @classmethod
    def write_sequences(cls, writer: OutputWriter | None, tensors: list[torch.Tensor], message: pb.Tensor) -> None:
        """One tensor per sequence, written as [n, ...]: without a stacked copy for the usual single sequence
        (writing copies it once anyway)."""
        cls.write(writer, tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors), message)

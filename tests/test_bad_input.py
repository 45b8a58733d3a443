"""Bad input gets the right status code and a message saying what is wrong; the daemon keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from kvd_client import KvdError
from kvd_client.shm import ShmRegion

from kvd.v1 import kvd_pb2 as pb
from kvd.v1 import kvd_pb2_grpc as pb_grpc

IA, NF, FP, RE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from tests.conftest import DaemonProcess

    # A small memory budget so that RESOURCE_EXHAUSTED can be provoked.
    d = DaemonProcess(tmp_path_factory.mktemp("bad"), ["--memory-budget", "4MiB"], tcp=False)
    d.start()
    client = d.client(shm=False)
    client.create_session("good", num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, dtype="fp16")
    client.append("good", 0, torch.randn(2, 2, 50, 8).half(), torch.randn(2, 2, 50, 8).half())
    client.create_session("empty", num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, dtype="fp16")
    client.create_session("graph", num_layers=1, num_kv_heads=2, num_query_heads=4, head_dim=8, dtype="bf16",
                          index="graph", index_params={"window": "2", "enhance_ef": "0"})
    client.append("graph", 0, torch.randn(1, 2, 40, 8).bfloat16(), torch.randn(1, 2, 40, 8).bfloat16())
    client.close()
    yield d
    d.stop()


@pytest.fixture
def stub(daemon):
    channel = grpc.insecure_channel(daemon.target)
    yield pb_grpc.KvdStub(channel)
    # After every bad request: the daemon is alive and still answers a good retrieve correctly.
    client = daemon.client(shm=False)
    assert client.health() == "SERVING"
    result = client.retrieve("good", 0, torch.ones(4, 8), k=3, mode="ids")
    assert result.ids.shape == (4, 3) and (result.ids >= 0).all()
    client.close()
    channel.close()


def tensor(t: torch.Tensor) -> pb.Tensor:
    from kvd_client.wire import encode_inline

    return encode_inline(t)


def expect(code: grpc.StatusCode, call, request, *needles: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    assert caught.value.code() == code, caught.value.details()
    for needle in needles:
        assert needle in caught.value.details(), caught.value.details()


def retrieve(**fields) -> pb.RetrieveRequest:
    base = {"session_ids": ["good"], "layer": 0, "queries": tensor(torch.ones(1, 4, 8)), "k": 5}
    base.update(fields)
    return pb.RetrieveRequest(**base)


def append(**fields) -> pb.AppendRequest:
    kv = torch.zeros(1, 2, 3, 8).half()
    base = {"session_id": "good", "start": 50, "layers": [0], "keys": tensor(kv), "values": tensor(kv)}
    base.update(fields)
    return pb.AppendRequest(**base)


def test_unknown_session(stub):
    expect(NF, stub.Retrieve, retrieve(session_ids=["nope"]), "nope")
    expect(NF, stub.GetSession, pb.GetSessionRequest(session_id="nope"), "not found")
    expect(NF, stub.DeleteSession, pb.DeleteSessionRequest(session_id="nope"))


def test_bad_query_shape_dtype_and_bytes(stub):
    expect(IA, stub.Retrieve, retrieve(queries=tensor(torch.ones(1, 3, 8))), "shape")
    expect(IA, stub.Retrieve, retrieve(queries=tensor(torch.ones(1, 4, 8, dtype=torch.int64))), "dtype")
    truncated = tensor(torch.ones(1, 4, 8))
    truncated.inline = truncated.inline[:-3]
    expect(IA, stub.Retrieve, retrieve(queries=truncated), "bytes")
    expect(IA, stub.Retrieve, retrieve(queries=pb.Tensor()), "missing")


def test_nan_and_inf(stub):
    q = torch.ones(1, 4, 8)
    q[0, 1, 2] = float("nan")
    expect(IA, stub.Retrieve, retrieve(queries=tensor(q)), "NaN")
    kv = torch.zeros(1, 2, 3, 8).half()
    kv[0, 0, 0, 0] = float("inf")
    expect(IA, stub.Append, append(keys=tensor(kv)), "NaN or infinite")


def test_k_and_layer_out_of_range(stub):
    expect(IA, stub.Retrieve, retrieve(k=0), "k = 0")
    expect(IA, stub.Retrieve, retrieve(k=10**9), "k =")
    expect(IA, stub.Retrieve, retrieve(layer=7), "layer")
    expect(IA, stub.Retrieve, retrieve(ranges=[pb.TokenRange(begin=10, end=99)]), "range")


def test_bad_thread_count(stub):
    expect(IA, stub.Retrieve, retrieve(search_params={"threads": "many"}), "threads", "'many'")
    expect(IA, stub.Retrieve, retrieve(search_params={"threads": "-2"}), "threads")
    expect(IA, stub.Retrieve, retrieve(search_params={"threads": str(10**6)}), "threads")


def test_bad_graph_search_params(stub):
    """Refused whether or not the layer's graph is built yet (the first Retrieve only starts its build)."""
    graph = {"session_ids": ["graph"]}
    expect(IA, stub.Retrieve, retrieve(**graph, search_params={"group": "3"}), "group", "'3'")
    expect(IA, stub.Retrieve, retrieve(**graph, search_params={"ef": "wide"}), "ef", "'wide'")
    expect(IA, stub.Retrieve, retrieve(**graph, search_params={"schedule": "random"}), "schedule")
    expect(IA, stub.Retrieve, retrieve(**graph, search_params={"touched": "some"}), "touched")
    ok = stub.Retrieve(retrieve(**graph, search_params={"group": "2", "ef": "64"}))
    assert len(ok.index_kinds) == 1


def test_layer_not_appended_yet(stub):
    expect(FP, stub.Retrieve, retrieve(session_ids=["empty"]), "no tokens")


def test_append_mismatches(stub):
    expect(FP, stub.Append, append(start=7), "must start at 50")
    kv32 = torch.zeros(1, 2, 3, 8)
    expect(IA, stub.Append, append(keys=tensor(kv32), values=tensor(kv32)), "dtype")
    expect(IA, stub.Append, append(values=tensor(torch.zeros(1, 2, 4, 8).half())), "shape")
    expect(IA, stub.Append, append(layers=[0, 0]), "twice")
    expect(IA, stub.Append, append(token_ids=[1, 2]), "token ids")


def test_bad_session_creation(stub):
    shape = pb.ModelShape(num_layers=2, num_kv_heads=3, num_query_heads=4, head_dim=8, dtype=pb.FLOAT16)
    expect(IA, stub.CreateSession, pb.CreateSessionRequest(session_id="x", shape=shape), "multiple")
    shape = pb.ModelShape(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, dtype=pb.INT64)
    expect(IA, stub.CreateSession, pb.CreateSessionRequest(session_id="x", shape=shape), "dtype")
    shape = pb.ModelShape(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, dtype=pb.FLOAT16)
    expect(IA, stub.CreateSession, pb.CreateSessionRequest(session_id="../etc", shape=shape), "session id")
    expect(grpc.StatusCode.ALREADY_EXISTS, stub.CreateSession,
           pb.CreateSessionRequest(session_id="good", shape=shape), "exists")
    # index params the kind cannot use are refused up front (a build failing on them would leave the layers
    # served by the exact scan, with the reason only in the daemon's log)
    for kind, params, words in ((pb.GRAPH, {"per": "token"}, "per"), (pb.GRAPH, {"m": "many"}, "many"),
                                (pb.GRAPH, {"store": "fp8"}, "store"), (pb.WAVE, {"cluster_size": "big"}, "wave")):
        options = pb.SessionOptions(index_kind=kind, index_params=params)
        expect(IA, stub.CreateSession, pb.CreateSessionRequest(session_id="y", shape=shape, options=options), words)
    options = pb.SessionOptions(index_kind=pb.GRAPH, index_params={"m": "16", "ef": "128"})
    stub.CreateSession(pb.CreateSessionRequest(session_id="fine-params", shape=shape, options=options))
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="fine-params"))


def test_over_memory_budget(stub):
    big = torch.zeros(1, 2, 300_000, 8).half()
    expect(RE, stub.Append, append(start=50, keys=tensor(big), values=tensor(big)), "budget")


def test_shared_memory_errors(stub, daemon):
    expect(NF, stub.RegisterSharedMemory, pb.RegisterSharedMemoryRequest(name="r", key="no-such-object",
                                                                         byte_size=64), "does not exist")
    expect(IA, stub.RegisterSharedMemory, pb.RegisterSharedMemoryRequest(name="r", key="../../etc/passwd",
                                                                         byte_size=64), "invalid")
    with ShmRegion.create(4096) as region:
        stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(name="mine", key=region.key, byte_size=4096))
        expect(grpc.StatusCode.ALREADY_EXISTS, stub.RegisterSharedMemory,
               pb.RegisterSharedMemoryRequest(name="mine", key=region.key, byte_size=4096))
        expect(IA, stub.RegisterSharedMemory,
               pb.RegisterSharedMemoryRequest(name="too-big", key=region.key, byte_size=8192), "bytes")
        ref = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 4, 8], shm=pb.SharedMemoryRef(region="mine", offset=4000,
                                                                                    byte_size=128))
        expect(IA, stub.Retrieve, retrieve(queries=ref), "exceeds")
        ref.shm.offset, ref.shm.byte_size = 0, 100
        expect(IA, stub.Retrieve, retrieve(queries=ref), "byte_size")
        ref.shm.region, ref.shm.byte_size = "unknown", 128
        expect(NF, stub.Retrieve, retrieve(queries=ref), "not registered")
        small_out = pb.SharedMemoryRef(region="mine", offset=0, byte_size=16)
        expect(IA, stub.Retrieve, retrieve(output=small_out), "too small")
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name="mine"))
    expect(NF, stub.UnregisterSharedMemory, pb.UnregisterSharedMemoryRequest(name="mine"))


def test_client_raises_typed_errors(daemon):
    from kvd_client import FailedPreconditionError, InvalidArgumentError, NotFoundError

    client = daemon.client()
    with pytest.raises(NotFoundError):
        client.get_session("missing")
    with pytest.raises(InvalidArgumentError):
        client.retrieve("good", 0, torch.ones(4, 8), k=-1 + 1)
    with pytest.raises(FailedPreconditionError):
        client.retrieve("empty", 0, torch.ones(4, 8), k=1)
    assert isinstance(NotFoundError(grpc.StatusCode.NOT_FOUND, "x"), KvdError)
    client.close()

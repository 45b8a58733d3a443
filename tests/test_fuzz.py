"""Hostile input: random request messages never crash, hang or corrupt the daemon, and get a proper status."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvd_client.shm import ShmRegion

from kvd.v1 import kvd_pb2 as pb
from kvd.v1 import kvd_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}
DTYPES = [pb.DTYPE_UNSPECIFIED, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT32, pb.INT64, pb.INT32, pb.UINT8, 99]
REGION_BYTES = 1 << 16


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    from tests.conftest import DaemonProcess

    daemon = DaemonProcess(tmp_path_factory.mktemp("fuzz"), ["--memory-budget", "64MiB"], tcp=False)
    daemon.start()
    client = daemon.client(shm=False)
    client.create_session("canary", num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8)
    canary = torch.randn(2, 2, 40, 8).half()
    client.append("canary", 0, canary, -canary)
    client.create_session("victim", num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8)
    client.append("victim", 0, canary, canary)
    region = ShmRegion.create(REGION_BYTES)
    client._invoke("RegisterSharedMemory", pb.RegisterSharedMemoryRequest(name="fz", key=region.key,
                                                                          byte_size=REGION_BYTES))
    channel = grpc.insecure_channel(daemon.target)
    yield daemon, pb_grpc.KvdStub(channel), canary
    channel.close()
    fetched = client.fetch("canary")
    assert torch.equal(fetched.keys, canary) and torch.equal(fetched.values, -canary), "canary corrupted"
    assert client.health() == "SERVING"
    client.close()
    log = daemon.log()
    daemon.stop()
    region.close()
    assert "internal error" not in log.lower() and "Traceback" not in log, log[-3000:]


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(-2, 9), min_size=0, max_size=5))
    message = pb.Tensor(dtype=dtype, shape=shape)
    kind = draw(st.sampled_from(["inline", "shm", "none"]))
    if kind == "inline":
        element = {pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT32: 4, pb.INT64: 8, pb.INT32: 4}.get(dtype, 1)
        count = 1
        for s in shape:
            count *= max(s, 0)
        size = count * element + draw(st.sampled_from([0, 0, 0, -1, 1, -7]))
        raw = draw(st.sampled_from(["random", "nan", "inf"]))
        payload = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
        if raw != "random" and dtype == pb.FLOAT32 and size >= 4:
            value = torch.tensor([float(raw)], dtype=torch.float32).numpy().tobytes()
            payload = value + payload[4:]
        message.inline = payload
    elif kind == "shm":
        message.shm.region = draw(st.sampled_from(["fz", "unknown", ""]))
        message.shm.offset = draw(st.sampled_from([0, 8, REGION_BYTES - 4, REGION_BYTES + 8, 2**63]))
        message.shm.byte_size = draw(st.sampled_from([0, 4, 64, 256, REGION_BYTES, 2**40]))
    return message


sessions = st.lists(st.sampled_from(["canary", "victim", "nope", "", "../x"]), min_size=0, max_size=3)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, object]:
    kind = draw(st.sampled_from(["Retrieve", "Append", "Fetch", "CreateSession", "Truncate", "Register"]))
    if kind == "Retrieve":
        return kind, pb.RetrieveRequest(
            session_ids=draw(sessions), layer=draw(st.integers(0, 5)), queries=draw(tensors()),
            k=draw(st.sampled_from([0, 1, 5, 100, 2**31 - 1])), mode=draw(st.integers(0, 5)),
            ranges=[pb.TokenRange(begin=draw(st.integers(0, 60)), end=draw(st.integers(0, 60)))
                    for _ in range(draw(st.integers(0, 3)))],
            scale=draw(st.sampled_from([0.0, 0.1, -1.0, float("nan"), float("inf")])),
            exact=draw(st.booleans()))
    if kind == "Append":
        return kind, pb.AppendRequest(
            session_id=draw(st.sampled_from(["victim", "nope", ""])), start=draw(st.sampled_from([0, 40, 41, 2**40])),
            layers=draw(st.lists(st.integers(0, 4), max_size=3)), keys=draw(tensors()), values=draw(tensors()),
            token_ids=draw(st.lists(st.integers(-5, 5), max_size=4)))
    if kind == "Fetch":
        return kind, pb.FetchRequest(session_id=draw(st.sampled_from(["victim", "nope"])),
                                     layers=draw(st.lists(st.integers(0, 4), max_size=3)),
                                     begin=draw(st.integers(0, 100)), end=draw(st.integers(0, 100)))
    if kind == "Truncate":
        return kind, pb.TruncateRequest(session_id="victim", num_tokens=draw(st.integers(0, 100)))
    if kind == "Register":
        return kind, pb.RegisterSharedMemoryRequest(
            name=draw(st.sampled_from(["", "r1", "x" * 300])),
            key=draw(st.sampled_from(["", "../../etc/passwd", "nonexistent", ".hidden", "a/b"])),
            offset=draw(st.sampled_from([0, 2**63])), byte_size=draw(st.sampled_from([0, 64, 2**62])))
    return kind, pb.CreateSessionRequest(
        session_id=draw(st.sampled_from(["f1", "", "../bad", "x" * 200])),
        shape=pb.ModelShape(num_layers=draw(st.integers(0, 3)), num_kv_heads=draw(st.integers(0, 3)),
                            num_query_heads=draw(st.integers(0, 7)), head_dim=draw(st.sampled_from([0, 8, 2**31])),
                            dtype=draw(st.sampled_from(DTYPES))),
        exist_ok=draw(st.booleans()))


METHODS = {"Retrieve": "Retrieve", "Append": "Append", "Fetch": "Fetch", "CreateSession": "CreateSession",
           "Truncate": "Truncate", "Register": "RegisterSharedMemory"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=requests())
def test_random_requests_get_a_proper_status(fuzz_target, request):
    _, stub, _ = fuzz_target
    kind, message = request
    try:
        getattr(stub, METHODS[kind])(message, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (kind, error.code(), error.details())


def test_delete_during_retrieve_never_breaks_other_sessions(fuzz_target):
    daemon, _, canary = fuzz_target
    client = daemon.client()
    failures: list[BaseException] = []
    stop = threading.Event()

    def retriever() -> None:
        reader = daemon.client()
        while not stop.is_set():
            try:
                reader.retrieve("churn", 1, torch.ones(4, 8), k=5)
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code not in ALLOWED:
                    failures.append(exc)
        reader.close()

    threads = [threading.Thread(target=retriever) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(30):
        client.create_session("churn", num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, exist_ok=True)
        client.append("churn", 0, canary, canary)
        client.delete_session("churn")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not failures, failures[:3]
    assert torch.equal(client.fetch("canary").keys, canary)
    client.close()

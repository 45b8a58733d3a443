"""Generates kvd/v1/kvd_pb2*.py from proto/kvd/v1/kvd.proto (used by `make proto` and setup.py)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO = ROOT / "proto" / "kvd" / "v1" / "kvd.proto"
OUT = ROOT / "kvd" / "v1"


def generate_proto() -> None:
    from grpc_tools import protoc

    targets = [OUT / "kvd_pb2.py", OUT / "kvd_pb2_grpc.py", OUT / "kvd_pb2.pyi"]
    if all(t.exists() and t.stat().st_mtime >= PROTO.stat().st_mtime for t in targets):
        return
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", str(PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate_proto()

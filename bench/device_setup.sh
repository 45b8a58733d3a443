# Source this on the lent GPU host (no internet): installs the wheels carried in .whl/ (see BENCHMARKS.md)
# into /tmp/site and puts kvd on the path. Generated protobuf modules must be carried too (kvd/v1/kvd_pb2*.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/hnswlib-0.8.0.tar.gz
export PYTHONPATH="/tmp/site:$PWD:$PWD/client:$PWD/integrations/transformers${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c "import kvd.v1.kvd_pb2_grpc, hnswlib, lmdb, grpc; print('kvd deps ok: grpc', grpc.__version__)"

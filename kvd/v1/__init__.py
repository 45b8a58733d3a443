"""Generated wire API (kvd.v1). The kvd_pb2*.py modules here are produced from proto/kvd/v1/kvd.proto."""

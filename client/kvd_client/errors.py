"""Exceptions raised by the kvd client: one class per gRPC status that a caller may want to handle."""

from __future__ import annotations

import grpc


class KvdError(Exception):
    """A call to the daemon failed. `.code` is the grpc.StatusCode, `.details` the daemon's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(KvdError):
    pass


class NotFoundError(KvdError):
    pass


class AlreadyExistsError(KvdError):
    pass


class FailedPreconditionError(KvdError):
    pass


class ResourceExhaustedError(KvdError):
    pass


class UnavailableError(KvdError):
    pass


class UnauthenticatedError(KvdError):
    pass


class PermissionDeniedError(KvdError):
    pass


class DataLossError(KvdError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def from_status(code: grpc.StatusCode, details: str) -> KvdError:
    return _BY_CODE.get(code, KvdError)(code, details or "")


def from_rpc_error(error: grpc.RpcError) -> KvdError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return from_status(code, details)

"""Errors that carry the gRPC status a client should see."""

from __future__ import annotations

import grpc


class KvdError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KvdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KvdError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KvdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(KvdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(KvdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(KvdError):
    code = grpc.StatusCode.DATA_LOSS


class Unavailable(KvdError):
    code = grpc.StatusCode.UNAVAILABLE

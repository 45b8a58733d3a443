"""Tiering policy between the memory tier and the disk tier. (Backbone: memory only.)"""

from __future__ import annotations

import torch

from kvd.config import Config
from kvd.errors import FailedPrecondition
from kvd.index.manager import IndexManager
from kvd.store.registry import Registry
from kvd.store.session import Session


class Tiering:
    def __init__(self, config: Config, registry: Registry, indexes: IndexManager) -> None:
        self.config = config
        self.registry = registry
        self.indexes = indexes

    def open(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def ensure_loaded(self, tenant: str, session_id: str) -> None:
        pass

    def on_create(self, session: Session) -> None:
        pass

    def on_append(self, session: Session, layers: list[int], start: int, n_tokens: int) -> None:
        pass

    def on_truncate(self, session: Session, num_tokens: int) -> None:
        pass

    def promote(self, session: Session) -> bool:
        return False

    def persist(self, session: Session, seal: bool) -> None:
        raise FailedPrecondition("this daemon has no disk tier configured")

    def persist_all(self) -> None:
        pass

    def delete(self, session: Session) -> int:
        return 0

    def lookup_prefix(self, tenant: str, token_ids: torch.Tensor) -> tuple[str, int]:
        return "", 0

    def disk_bytes(self) -> int:
        return 0

    def export_chunks(self, tenant: str, session_id: str) -> list[bytes]:
        raise FailedPrecondition("this daemon has no disk tier configured")

    def import_bytes(self, tenant: str, data: bytes) -> Session:
        raise FailedPrecondition("this daemon has no disk tier configured")

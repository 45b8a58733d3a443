"""Per-session, per-layer index lifecycle. (Backbone: every layer is served by the exact scan.)"""

from __future__ import annotations

import torch

from kvd.config import IndexConfig
from kvd.errors import InvalidArgument
from kvd.store.session import Session


class IndexManager:
    def __init__(self, config: IndexConfig) -> None:
        self.config = config

    def check_hints(self, session: Session, layers: list[int], queries: torch.Tensor | None,
                    topn: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        shape = session.shape
        expected = (len(layers), shape.num_query_heads)
        if queries is not None and (queries.dim() != 4 or tuple(queries.shape[:2]) != expected
                                    or queries.shape[3] != shape.head_dim):
            raise InvalidArgument(
                f"hint queries must be [{len(layers)}, {shape.num_query_heads}, n_samples, {shape.head_dim}],"
                f" got {list(queries.shape)}"
            )
        if topn is not None:
            if queries is None:
                raise InvalidArgument("hint top-N ids need the hint queries they belong to")
            if topn.dim() != 4 or tuple(topn.shape[:3]) != tuple(queries.shape[:3]):
                raise InvalidArgument(
                    f"hint top-N ids must be [{', '.join(map(str, queries.shape[:3]))}, N], got {list(topn.shape)}"
                )
        return queries, topn

    def on_append(self, session: Session, layers: list[int], hints: tuple) -> None:
        pass

    def on_truncate(self, session: Session, num_tokens: int) -> None:
        pass

    def drop(self, session: Session) -> None:
        session.indexes = [None] * session.shape.num_layers

    def close(self) -> None:
        pass

    def queue_length(self) -> int:
        return 0

    def export_blobs(self, session: Session) -> dict[int, bytes]:
        return {}

    def import_blobs(self, session: Session, blobs: dict) -> None:
        pass

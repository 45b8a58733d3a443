"""asyncio kvd client.

Each call runs the synchronous client's call in a worker thread (gRPC and the tensor copies release the GIL),
so an event loop can overlap a Retrieve with GPU work, and several calls with each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvd_client.client import KvdClient
from kvd_client.prepared import PreparedRetrieve
from kvd_client.types import FetchResult, RetrieveResult, SessionInfo, Stats


class AsyncKvdClient:
    """Same arguments and methods as KvdClient, awaitable. Calls are serialized per client (they share one
    shared-memory region); open several clients for parallel calls."""

    def __init__(self, target: str | None = None, **options: Any) -> None:
        self.sync = KvdClient(target, **options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvd-client")

    async def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: getattr(self.sync, method)(*args, **kwargs))

    async def create_session(self, session_id: str = "", **kwargs: Any) -> SessionInfo:
        return await self._run("create_session", session_id, **kwargs)

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self._run("get_session", session_id)

    async def list_sessions(self, prefix: str = "") -> list[SessionInfo]:
        return await self._run("list_sessions", prefix)

    async def delete_session(self, session_id: str) -> Any:
        return await self._run("delete_session", session_id)

    async def stats(self) -> Stats:
        return await self._run("stats")

    async def health(self, service: str = "") -> str:
        return await self._run("health", service)

    async def append(self, session_id: str, start: int, keys: Any, values: Any, **kwargs: Any) -> Any:
        return await self._run("append", session_id, start, keys, values, **kwargs)

    async def retrieve(self, session_ids: str | Sequence[str], layer: int, queries: Any, **kwargs: Any
                       ) -> RetrieveResult:
        return await self._run("retrieve", session_ids, layer, queries, **kwargs)

    async def prepare_retrieve(self, session_ids: str | Sequence[str], **kwargs: Any) -> AsyncPreparedRetrieve:
        """KvdClient.prepare_retrieve; the plan's run() is awaitable."""
        return AsyncPreparedRetrieve(self, await self._run("prepare_retrieve", session_ids, **kwargs))

    async def fetch(self, session_id: str, begin: int = 0, end: int | None = None, **kwargs: Any) -> FetchResult:
        return await self._run("fetch", session_id, begin, end, **kwargs)

    async def persist(self, session_id: str, *, seal: bool = False) -> int:
        return await self._run("persist", session_id, seal=seal)

    async def truncate(self, session_id: str, num_tokens: int) -> SessionInfo:
        return await self._run("truncate", session_id, num_tokens)

    async def lookup_prefix(self, token_ids: Any) -> tuple[str | None, int]:
        return await self._run("lookup_prefix", token_ids)

    async def close(self) -> None:
        await self._run("close")
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncKvdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncPreparedRetrieve:
    """A PreparedRetrieve (`plan`) whose run and close are awaitable; write the inputs into plan.queries (and
    plan.seen_ids / plan.seen_from) before each run, as with the synchronous plan."""

    def __init__(self, client: AsyncKvdClient, plan: PreparedRetrieve) -> None:
        self.client = client
        self.plan = plan

    async def run(self, layer: int, ranges: Sequence[tuple[int, int]] | None = None) -> RetrieveResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.client._executor, self.plan.run, layer, ranges)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.client._executor, self.plan.close)

"""Session registry of the memory tier: lookup by (tenant, id), memory accounting under a byte budget."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from kvd.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from kvd.store.session import ModelShape, Session, SessionOptions, Tier

RESERVE_PATIENCE_SECONDS = 5.0
_SESSION_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,127}$")


def validate_session_id(session_id: str) -> str:
    if not _SESSION_ID.match(session_id):
        raise InvalidArgument(
            f"invalid session id {session_id!r}: 1-128 characters of [A-Za-z0-9_.:@-], not starting with "
            "'.', ':', '@' or '-'"
        )
    return session_id


class Registry:
    def __init__(self, memory_budget_bytes: int) -> None:
        self.memory_budget_bytes = memory_budget_bytes
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()
        # Called with the bytes needed when an allocation would exceed the budget; frees memory (by spilling
        # idle sessions to disk) and returns True if it freed enough. Set by the tiering layer.
        self.make_room: Callable[[int, Session | None], bool] | None = None

    def create(self, tenant: str, session_id: str, shape: ModelShape, options: SessionOptions,
               exist_ok: bool = False) -> tuple[Session, bool]:
        session_id = validate_session_id(session_id) if session_id else uuid.uuid4().hex
        with self._lock:
            existing = self._sessions.get((tenant, session_id))
            if existing is not None:
                if not exist_ok:
                    raise AlreadyExists(f"session {session_id!r} already exists")
                if existing.shape != shape:
                    raise AlreadyExists(
                        f"session {session_id!r} exists with another shape ({_describe(existing.shape)}, "
                        f"asked {_describe(shape)})"
                    )
                return existing, False
            session = Session(session_id, tenant, shape, options)
            self._sessions[session.key] = session
            return session, True

    def add(self, session: Session) -> None:
        """Register a session restored from disk."""
        with self._lock:
            self._sessions[session.key] = session

    def get(self, tenant: str, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get((tenant, session_id))
        if session is None:
            raise NotFound(f"session {session_id!r} not found")
        return session

    def find(self, tenant: str, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get((tenant, session_id))

    def remove(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]

    def sessions(self, tenant: str | None = None) -> list[Session]:
        with self._lock:
            items: Iterable[Session] = list(self._sessions.values())
        if tenant is not None:
            items = [s for s in items if s.tenant == tenant]
        return sorted(items, key=lambda s: s.session_id)

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes for s in self.sessions())

    def reserve(self, extra_bytes: int, requester: Session | None) -> None:
        """Make sure `extra_bytes` more fit in the memory budget, spilling idle sessions if needed."""
        if extra_bytes <= 0:
            return
        # Sessions busy right now cannot be spilled; they usually are idle a few milliseconds later, so wait
        # a little before refusing.
        deadline = time.monotonic() + RESERVE_PATIENCE_SECONDS
        delay = 0.002
        while True:
            used = self.memory_bytes()
            if used + extra_bytes <= self.memory_budget_bytes:
                return
            needed = used + extra_bytes - self.memory_budget_bytes
            if self.make_room is not None and self.make_room(needed, requester):
                return
            if self.make_room is None or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise ResourceExhausted(
            f"memory budget exceeded: {used + extra_bytes} bytes needed, budget {self.memory_budget_bytes} "
            f"bytes, and no idle session could be moved to disk"
        )

    def counts(self) -> tuple[int, int]:
        sessions = self.sessions()
        in_memory = sum(1 for s in sessions if s.tier is Tier.MEMORY)
        return in_memory, len(sessions) - in_memory


def _describe(shape: ModelShape) -> str:
    return (f"layers={shape.num_layers} kv_heads={shape.num_kv_heads} query_heads={shape.num_query_heads} "
            f"head_dim={shape.head_dim} dtype={str(shape.dtype).removeprefix('torch.')}")

"""The LMDB environment of the disk tier: atomic writes, checksummed reads, growth of the map, usage."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lmdb

from kvd.store import records
from kvd.store.rwlock import RWLock

log = logging.getLogger("kvd.disk")
# Chunks are written in transactions of at most this many payload bytes, the manifest in the last one.
TXN_BYTES = 1 << 30


class FormatError(RuntimeError):
    pass


class DiskStore:
    def __init__(self, data_dir: str, map_size: int, sync: bool) -> None:
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.path = path / "kvd.lmdb"
        self.sync_on_commit = sync
        # readahead: records are large and read sequentially (cold reads 2.1 vs 0.35 GB/s on the GPU host,
        # bench/lmdb_probe.py). writemap would write faster there (1.46 vs 0.80 GB/s) but every page written
        # through the map counts in the daemon's resident memory, defeating the memory budget's spills.
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=4, subdir=True, sync=sync,
                             metasync=sync, readahead=True, max_readers=512, lock=True)
        self.meta = self.env.open_db(b"meta")
        self.sessions = self.env.open_db(b"sessions")
        self.chunks = self.env.open_db(b"chunks")
        # Shared by every transaction, exclusive while the map grows (LMDB needs no open transaction then).
        self._resize = RWLock()
        self._writer = threading.Lock()
        self._check_format()

    def _check_format(self) -> None:
        with self.env.begin(write=True, db=self.meta) as txn:
            raw = txn.get(b"format")
            if raw is None:
                txn.put(b"format", json.dumps({"format": records.FORMAT_NAME,
                                               "version": records.FORMAT_VERSION}).encode())
                return
        found = json.loads(bytes(raw))
        if found.get("format") != records.FORMAT_NAME or found.get("version") != records.FORMAT_VERSION:
            raise FormatError(f"{self.path} holds {found}, this kvd reads {records.FORMAT_NAME} "
                              f"v{records.FORMAT_VERSION}")

    # -- writes ----------------------------------------------------------------------------------------

    def _write(self, operation: Callable[[lmdb.Transaction], None]) -> None:
        """Run `operation` in one write transaction, growing the map and retrying when it is full."""
        while True:
            try:
                with self._writer, self._resize.read(), self.env.begin(write=True) as txn:
                    operation(txn)
                return
            except lmdb.MapFullError:
                self._grow()

    def _grow(self) -> None:
        with self._resize.write():
            size = self.env.info()["map_size"] * 2
            self.env.set_mapsize(size)
            log.info("disk tier map grown", extra={"fields": {"map_size": size}})

    def write(self, manifest: records.Manifest, chunks: Iterable[tuple[bytes, bytes]],
              delete: Iterable[bytes] = ()) -> None:
        """Write chunk records in bounded transactions, then delete old keys and write the manifest in the
        last one: the manifest only ever names chunks that are already committed."""
        batch: list[tuple[bytes, bytes]] = []
        size = 0

        def flush(items: list[tuple[bytes, bytes]]) -> Callable[[lmdb.Transaction], None]:
            def put(txn: lmdb.Transaction) -> None:
                for key, value in items:
                    txn.put(key, value, db=self.chunks)
            return put

        for key, payload in chunks:
            batch.append((key, records.frame(payload)))
            size += len(payload)
            if size >= TXN_BYTES:
                self._write(flush(batch))
                batch, size = [], 0
        stale = list(delete)

        def finish(txn: lmdb.Transaction) -> None:
            flush(batch)(txn)
            for key in stale:
                txn.delete(key, db=self.chunks)
            txn.put(records.session_key(manifest.tenant, manifest.session_id), manifest.to_bytes(),
                    db=self.sessions)

        self._write(finish)

    def put_manifest(self, manifest: records.Manifest) -> None:
        self._write(lambda txn: txn.put(records.session_key(manifest.tenant, manifest.session_id),
                                        manifest.to_bytes(), db=self.sessions))

    def delete_session(self, tenant: str, session_id: str) -> None:
        prefix = records.chunk_prefix(tenant, session_id)

        def remove(txn: lmdb.Transaction) -> None:
            txn.delete(records.session_key(tenant, session_id), db=self.sessions)
            cursor = txn.cursor(db=self.chunks)
            if cursor.set_range(prefix):
                while bytes(cursor.key()).startswith(prefix):
                    if not cursor.delete():
                        break

        self._write(remove)

    def sync(self) -> None:
        self.env.sync(True)

    # -- reads -----------------------------------------------------------------------------------------

    def read(self, keys: Iterable[tuple[bytes, str]], consume: Callable[[bytes, memoryview], None]) -> None:
        """For each (key, description): verify the record and hand its payload (valid only during the call)
        to consume(key, payload). Raises records.CorruptRecord on a missing or damaged record."""
        with self._resize.read(), self.env.begin(db=self.chunks, buffers=True) as txn:
            for key, what in keys:
                raw = txn.get(key)
                if raw is None:
                    raise records.CorruptRecord(f"{what}: record is missing")
                consume(key, records.unframe(raw, what))

    def manifests(self) -> Iterator[tuple[bytes, bytes]]:
        with self._resize.read(), self.env.begin(db=self.sessions) as txn:
            yield from list(txn.cursor())

    def chunk_keys(self) -> list[bytes]:
        with self._resize.read(), self.env.begin(db=self.chunks) as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    def delete_chunks(self, keys: list[bytes]) -> None:
        def remove(txn: lmdb.Transaction) -> None:
            for key in keys:
                txn.delete(key, db=self.chunks)
        self._write(remove)

    def used_bytes(self) -> int:
        """Bytes of the pages LMDB uses for our databases (freed pages are reused by later writes)."""
        with self._resize.read(), self.env.begin() as txn:
            total = 0
            for db in (self.meta, self.sessions, self.chunks):
                stat = txn.stat(db)
                total += stat["psize"] * (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])
            return total

    def file_bytes(self) -> int:
        data = self.path / "data.mdb"
        return data.stat().st_size if data.exists() else 0

    def close(self) -> None:
        with self._resize.write():
            self.env.sync(True)
            self.env.close()

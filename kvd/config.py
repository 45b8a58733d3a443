"""One typed configuration: embedded defaults < TOML file < KVD_* environment < command-line flags.

Environment variables are named KVD_<SECTION>_<KEY>, e.g. KVD_STORAGE_MEMORY_BUDGET=8GiB.
Byte sizes accept integers or strings with a unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class ConfigError(ValueError):
    pass


def parse_bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a byte size: {value!r} (examples: 1048576, 512MiB, 8GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "kvd" if base else Path(f"/tmp/kvd-{os.getuid()}")


def default_socket() -> str:
    return str(_runtime_dir() / "kvd.sock")


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "kvd")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3


@dataclass
class ServerConfig:
    socket: str = field(default_factory=default_socket)
    socket_mode: int = 0o660
    tcp: str = ""                 # "host:port"; empty = no TCP listener
    token_file: str = ""          # tenants and bearer tokens; required for TCP unless allow_insecure_tcp
    allow_insecure_tcp: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    metrics: str = ""             # "host:port" of the Prometheus endpoint; empty = off
    max_message_mb: int = 1024
    workers: int = 0              # retrieval threads; 0 = CPU count
    region_threads: int = 0       # threads of the kernels' parallel regions; 0 = one per core
    grace_seconds: float = 10.0   # drain time for in-flight calls on shutdown
    fast_lane: bool = True        # Retrieve/Append/Fetch over a plain socket at <socket>.fast (local clients)
    fast_lane_connections: int = 64


@dataclass
class StorageConfig:
    data_dir: str = field(default_factory=default_data_dir)
    memory_budget: int = 0        # bytes of KV + indexes in RAM; 0 = half the machine's memory
    disk_budget: int = 0          # bytes in LMDB; 0 = unlimited
    lmdb_map_size: int = 1024**3  # initial map size; grown as needed
    durability: str = "sync"      # "sync": Persist returns after fsync; "interval": synced every sync_interval
    sync_interval_seconds: float = 1.0
    default_ttl_seconds: int = 0  # idle sessions expire after this; 0 = never
    persist_on_shutdown: bool = True
    huge_pages: bool = True       # ask for transparent huge pages on KV stores and graph rows (kvd.hugepages)


@dataclass
class IndexConfig:
    default_kind: str = "flat"
    build_threads: int = 0        # 0 = CPU count
    concurrent_builds: int = 4    # index builds running at once (each uses every core); the rest queue


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "json"          # "json" or "text"


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def memory_budget_bytes(self) -> int:
        return self.storage.memory_budget or _physical_memory() // 2

    def validate(self) -> Config:
        if self.storage.durability not in ("sync", "interval"):
            raise ConfigError(f"storage.durability must be 'sync' or 'interval', not {self.storage.durability!r}")
        if self.log.format not in ("json", "text"):
            raise ConfigError(f"log.format must be 'json' or 'text', not {self.log.format!r}")
        if self.index.default_kind not in ("flat", "hnsw", "graph", "wave"):
            raise ConfigError(f"index.default_kind {self.index.default_kind!r} is not flat, hnsw, graph or wave")
        if self.index.concurrent_builds < 1:
            raise ConfigError("index.concurrent_builds must be at least 1")
        if self.server.tcp and not re.fullmatch(r".+:[0-9]{1,5}", self.server.tcp):
            raise ConfigError(f"server.tcp must be host:port, not {self.server.tcp!r}")
        if bool(self.server.tls_cert) != bool(self.server.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together")
        if not 0 <= self.server.region_threads <= 1024:
            raise ConfigError("server.region_threads must be in [0, 1024] (0 = one per core)")
        if self.server.max_message_mb < 4:
            raise ConfigError("server.max_message_mb must be at least 4")
        if self.server.fast_lane_connections < 1:
            raise ConfigError("server.fast_lane_connections must be at least 1 (server.fast_lane = false turns "
                              "the fast lane off)")
        return self


_BYTE_FIELDS = {("storage", "memory_budget"), ("storage", "disk_budget"), ("storage", "lmdb_map_size")}


def _coerce(section: str, name: str, kind: Any, value: Any) -> Any:
    if (section, name) in _BYTE_FIELDS:
        return parse_bytes(value)
    try:
        if kind is bool or kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if kind is int or kind == "int":
            return int(value, 0) if isinstance(value, str) else int(value)
        if kind is float or kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{name}: cannot use {value!r} as {kind}") from None


def _apply(config: Config, section: str, name: str, value: Any, origin: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(sorted(sections))})")
    target = getattr(config, section)
    fields = {f.name: f.type for f in dataclasses.fields(target)}
    if name not in fields:
        raise ConfigError(f"{origin}: unknown key {section}.{name} (known: {', '.join(sorted(fields))})")
    setattr(target, name, _coerce(section, name, fields[name], value))


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Build the config: defaults, then `path` (TOML), then KVD_* environment, then `overrides`
    ({"section.key": value})."""
    config = Config()
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("KVD_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for name, value in values.items():
                _apply(config, section, name, value, path)
    for section_field in dataclasses.fields(Config):
        for key_field in dataclasses.fields(getattr(config, section_field.name)):
            env_name = f"KVD_{section_field.name}_{key_field.name}".upper()
            if env_name in environ:
                _apply(config, section_field.name, key_field.name, environ[env_name], env_name)
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        _apply(config, section, name, value, "command line")
    return config.validate()


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)

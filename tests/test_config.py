"""The typed config: defaults, TOML, KVD_* environment, overrides, and clear errors."""

from __future__ import annotations

import pytest

from kvd.config import ConfigError, load, parse_bytes


def test_defaults_need_no_file():
    config = load(environ={})
    assert config.server.socket.endswith("kvd.sock")
    assert config.memory_budget_bytes > 0
    assert config.storage.durability == "sync"


def test_precedence_file_env_overrides(tmp_path):
    path = tmp_path / "kvd.toml"
    path.write_text('[server]\nsocket = "/tmp/a.sock"\ntcp = "127.0.0.1:7000"\n[storage]\nmemory_budget = "2GiB"\n')
    config = load(str(path), environ={"KVD_SERVER_SOCKET": "/tmp/b.sock"})
    assert config.server.socket == "/tmp/b.sock"
    assert config.server.tcp == "127.0.0.1:7000"
    assert config.storage.memory_budget == 2 * 1024**3
    config = load(str(path), {"storage.memory_budget": "512MiB", "index.default_kind": "flat"},
                  environ={"KVD_STORAGE_MEMORY_BUDGET": "1GiB"})
    assert config.storage.memory_budget == 512 * 1024**2


@pytest.mark.parametrize(("text", "message"), [
    ("[nope]\nx = 1\n", "unknown section"),
    ("[server]\nsockett = 1\n", "unknown key server.sockett"),
    ("[storage]\nmemory_budget = \"lots\"\n", "not a byte size"),
    ("[storage]\ndurability = \"maybe\"\n", "durability"),
    ("[server]\ntcp = \"nohost\"\n", "host:port"),
    ("[server]\nregion_threads = -1\n", "region_threads"),
    ("[server\n", "kvd.toml"),
])
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "kvd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(str(path), environ={})


def test_parse_bytes_units():
    assert parse_bytes("1KiB") == 1024 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(7) == 7
    with pytest.raises(ConfigError):
        parse_bytes(True)


def test_cli_reports_config_errors(capsys):
    from kvd.cli import main

    assert main(["serve", "--set", "storage.durability=never"]) == 2
    assert "durability" in capsys.readouterr().err

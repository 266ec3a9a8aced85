from __future__ import annotations

import pytest

from phonon_cli.exceptions import StoreUnavailable
from phonon_cli.store.connection import EmbeddedServer, StoreSettings, connect, redact


def test_redact_hides_password() -> None:
    assert redact("redis://user:s3cret@host:6380/0") == "redis://user:***@host:6380/0"
    assert redact("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_unreachable_store_names_url_without_password() -> None:
    with pytest.raises(StoreUnavailable) as e:
        connect("redis://admin:hunter2@127.0.0.1:1/0", attempts=1)
    assert "127.0.0.1:1" in str(e.value)
    assert "hunter2" not in str(e.value)
    assert "***" in str(e.value)


def test_embedded_server_is_shared_by_home(tmp_path) -> None:
    home = tmp_path / "home"
    a = StoreSettings(home=str(home)).connect()
    try:
        a.set("x", "1")
        b = StoreSettings(home=str(home)).connect()
        assert b.get("x") == "1"
        assert (home / "redis.pid").exists()
    finally:
        EmbeddedServer(home).stop()
    assert not EmbeddedServer(home).is_running()


def test_settings_from_env(monkeypatch) -> None:
    monkeypatch.setenv("PHONON_REDIS_URL", "redis://h:1/2")
    monkeypatch.setenv("PHONON_NAMESPACE", "ns1")
    s = StoreSettings.from_env()
    assert (s.url, s.namespace) == ("redis://h:1/2", "ns1")
    assert StoreSettings.from_env(url="redis://x/0", namespace="n2").namespace == "n2"


def test_status_and_flush_never_start_a_store_in_an_empty_home(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from phonon_cli.cli import main

    home = tmp_path / "typo"
    monkeypatch.delenv("PHONON_REDIS_URL", raising=False)
    monkeypatch.setenv("PHONON_HOME", str(home))
    for args in (["status"], ["flush", "--all"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 3, result.output
        assert f"no embedded store in {home}" in result.output
    assert not home.exists()

"""The light reader of a service client's settings agrees with the full config, and defers to it on doubt."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from sandbox_core import config as full
from sandbox_core.client_config import ALL_KEYS, SECTIONS, ClientSettings, read_client_settings
from sandbox_core.errors import ConfigError


def expected(path: Path | None, env: dict[str, str], overrides: dict[str, Any] | None = None) -> ClientSettings:
    cfg = full.load_config(path, environ=env, overrides=overrides).config
    socket_path = cfg.service.socket_path
    return ClientSettings(cfg.service.server_uids, None if socket_path is None else str(socket_path),
                          cfg.limits.processes)


def test_it_knows_every_key_and_section_the_config_has() -> None:
    assert frozenset(full.field_types()) == ALL_KEYS
    assert frozenset(full._SECTIONS) == SECTIONS
    assert ClientSettings() == expected(None, {"XDG_CONFIG_HOME": "/nonexistent-thin"})
    assert typing.get_args(full.Profile) == ("strict", "process")


FILE = '[service]\nserver_uids = ["1001"]\nsocket_path = "/run/thin/s.sock"\n[limits]\nprocesses = 64\n'


def _layers(tmp_path: Path, text: str | None, env: dict[str, str]) -> tuple[Path | None, dict[str, str]]:
    """The config file (written from ``text``, if any) and an environment with no user config."""
    path = None
    if text is not None:
        path = tmp_path / "c.toml"
        path.write_text(text)
    return path, {"XDG_CONFIG_HOME": str(tmp_path / "none"), **env}


@pytest.mark.parametrize(
    ("text", "env", "overrides", "want"),
    [
        (None, {}, None, ClientSettings()),
        (FILE, {}, None, ClientSettings(("1001",), "/run/thin/s.sock", 64)),
        (FILE, {"SANDBOX_SERVICE__SERVER_UIDS": " 1002, 1003 ,", "SANDBOX_LIMITS__PROCESSES": "32",
                "SANDBOX_SERVICE__SOCKET_PATH": "none", "SANDBOX_PROFILE": "process", "SANDBOX_MIN_IDLE": "0"},
         None, ClientSettings(("1002", "1003"), None, 32)),
        (FILE, {"SANDBOX_LIMITS__PROCESSES": "32"}, {"limits.processes": 16, "allow_root_process": True,
                                                      "service.socket_path": None},
         ClientSettings(("1001",), "/run/thin/s.sock", 16)),
        ("[limits]\nprocesses = 0\n", {"SANDBOX_SERVICE__SOCKET_PATH": "~/s.sock"}, None,
         ClientSettings((), str(Path("~/s.sock").expanduser()), 0)),
    ],
    ids=["defaults", "file", "env-over-file", "flag-over-env", "home-and-zero"],
)
def test_it_reads_what_load_config_gives(
    tmp_path: Path, text: str | None, env: dict[str, str], overrides: dict[str, Any] | None, want: ClientSettings,
) -> None:
    path, env = _layers(tmp_path, text, env)
    got = read_client_settings(path, environ=env, overrides=overrides)
    assert got == expected(path, env, overrides) == want


def test_the_default_file_is_read_like_load_config_reads_it(tmp_path: Path) -> None:
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "sandbox" / "config.toml").write_text(FILE)
    for env in ({"XDG_CONFIG_HOME": str(tmp_path)},
                {"XDG_CONFIG_HOME": "/nonexistent-thin", "SANDBOX_CONFIG": str(tmp_path / "sandbox" / "config.toml")}):
        got = read_client_settings(None, environ=env)
        assert got == expected(None, env) == ClientSettings(("1001",), "/run/thin/s.sock", 64)


@pytest.mark.parametrize(
    ("text", "env", "overrides"),
    [
        (None, {"SANDBOX_LIMITS__PROCESSES": "-1"}, None),
        (None, {"SANDBOX_LIMITS__PROCESSES": "many"}, None),
        ("[limits]\nprocesses = true\n", {}, None),
        ("[limits]\nprocesses = 1.5\n", {}, None),
        (None, {"SANDBOX_SERVICE__SERVER_UIDS": "1001,root"}, None),
        ('[service]\nserver_uids = [1001]\n', {}, None),
        (None, {"SANDBOX_SERVICE__SOCKET_PATH": "relative/s.sock"}, None),
        ('[service]\nsocket_path = "/run/../tmp/s.sock"\n', {}, None),
        ('[service]\nsocket_path = ""\n', {}, None),
        (None, {"SANDBOX_SERVICE__SERVR_UIDS": "1001"}, None),
        ("[service]\nno_such = 1\n", {}, None),
        ("service = 3\n", {}, None),
        ("[service\n", {}, None),
        (None, {}, {"limits.processes": "32"}),
        (None, {}, {"no_such": 1}),
    ],
)
def test_a_bad_value_it_reads_defers_to_the_full_config(
    tmp_path: Path, text: str | None, env: dict[str, str], overrides: dict[str, Any] | None,
) -> None:
    path, env = _layers(tmp_path, text, env)
    assert read_client_settings(path, environ=env, overrides=overrides) is None
    with pytest.raises(ConfigError):
        full.load_config(path, environ=env, overrides=overrides)


def test_a_missing_explicit_file_defers_too(tmp_path: Path) -> None:
    assert read_client_settings(tmp_path / "missing.toml", environ={}) is None
    with pytest.raises(ConfigError, match="not found"):
        full.load_config(tmp_path / "missing.toml", environ={})

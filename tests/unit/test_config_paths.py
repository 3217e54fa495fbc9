"""Every path setting names one absolute place: empty, relative or '..' entries are ConfigErrors.

An empty path is the worst case: ``os.path.realpath("")`` is the current directory, so
``strict.ro_binds = [""]`` used to bind whatever directory the host happened to run in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_core.config import load_config
from sandbox_core.errors import ConfigError

BAD_TOML = [
    ('workspace_root = ""', "workspace_root", "''"),
    ('workspace_root = "srv/ws"', "workspace_root", "'srv/ws'"),
    ('workspace_root = "/"', "workspace_root", "'/'"),
    ('workspace_root = "/srv/../etc"', "workspace_root", "'/srv/../etc'"),
    ('[strict]\nro_binds = [""]', "strict.ro_binds", "''"),
    ('[strict]\nro_binds = ["opt/tools"]', "strict.ro_binds", "'opt/tools'"),
    ('[strict]\nro_binds = [":/tools"]', "strict.ro_binds", "':/tools'"),
    ('[strict]\nro_binds = ["/opt/tools:"]', "strict.ro_binds", "'/opt/tools:'"),
    ('[strict]\nrw_binds = ["/srv/data:data"]', "strict.rw_binds", "'/srv/data:data'"),
    ('[strict]\nrw_binds = ["/srv/../root"]', "strict.rw_binds", "'/srv/../root'"),
    ('[strict]\ndeny_paths = [""]', "strict.deny_paths", "''"),
    ('[strict]\ndeny_paths = ["etc/passwd"]', "strict.deny_paths", "'etc/passwd'"),
    ('[strict]\ndeny_paths = ["/data/../etc"]', "strict.deny_paths", "'/data/../etc'"),
    ('[strict]\nbwrap = ""', "strict.bwrap", "''"),
    ('[strict]\nbwrap = "./bwrap"', "strict.bwrap", "'./bwrap'"),
    ('[service]\nsocket_path = ""', "service.socket_path", "''"),
    ('[service]\nsocket_path = "run/sandbox.sock"', "service.socket_path", "'run/sandbox.sock'"),
    ('[service]\ntokens_file = "tokens.toml"', "service.tokens_file", "'tokens.toml'"),
]


@pytest.mark.parametrize(("toml", "field", "entry"), BAD_TOML)
def test_a_bad_path_in_the_file_names_the_setting_and_the_entry(
    tmp_path: Path, toml: str, field: str, entry: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.field == field
    assert entry in info.value.message


BAD_ENV = [
    ({"SANDBOX_WORKSPACE_ROOT": "/"}, "workspace_root", "'/'"),
    ({"SANDBOX_STRICT__RO_BINDS": "/opt/tools,relative"}, "strict.ro_binds", "'relative'"),
    ({"SANDBOX_STRICT__RW_BINDS": "/srv/x:"}, "strict.rw_binds", "'/srv/x:'"),
    ({"SANDBOX_STRICT__DENY_PATHS": "/usr/share/x,etc"}, "strict.deny_paths", "'etc'"),
    ({"SANDBOX_STRICT__BWRAP": "bin/bwrap"}, "strict.bwrap", "'bin/bwrap'"),
    ({"SANDBOX_SERVICE__TOKENS_FILE": "t.toml"}, "service.tokens_file", "'t.toml'"),
]


@pytest.mark.parametrize(("env", "field", "entry"), BAD_ENV)
def test_a_bad_path_in_the_environment_names_the_setting_and_the_entry(
    tmp_path: Path, env: dict[str, str], field: str, entry: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"XDG_CONFIG_HOME": str(tmp_path), **env})
    assert info.value.field == field
    assert entry in info.value.message


def test_good_paths_load(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'workspace_root = "~/ws"\n'
        "[strict]\n"
        'bwrap = "/usr/bin/bwrap"\n'
        'ro_binds = ["/opt/tools", "/srv/a:/a"]\n'
        'rw_binds = ["/srv/b:/b"]\n'
        'deny_paths = ["/usr/share/secret-stuff"]\n'
        "[service]\n"
        'socket_path = "/run/sandbox/sandbox.sock"\n'
    )
    cfg = load_config(path, environ={"SANDBOX_STRICT__BWRAP": "bwrap"}).config
    assert cfg.workspace_root.is_absolute() and cfg.strict.bwrap == "bwrap"
    assert cfg.strict.ro_binds == ("/opt/tools", "/srv/a:/a")
    # an empty variable unsets an optional path rather than naming the current directory
    unset = load_config(path, environ={"SANDBOX_SERVICE__SOCKET_PATH": ""}).config
    assert unset.service.socket_path is None

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_core.config import (
    ProcessSandboxConfig,
    Secret,
    load_config,
)
from sandbox_core.errors import ConfigError
from sandbox_core.isolation.spec import worker_env
from sandbox_core.names import validate_user_id


def test_defaults_are_strict_and_minimal() -> None:
    cfg = ProcessSandboxConfig()
    assert cfg.profile == "strict"
    assert set(cfg.env.allow) == {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ"}
    assert cfg.limits.core_dumps is False


def test_precedence_file_env_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('max_workers = 3\nmin_idle = 2\n[limits]\ncpu_seconds = 11\nopen_files = 99\n')
    env = {"SANDBOX_MAX_WORKERS": "5", "SANDBOX_LIMITS__CPU_SECONDS": "22"}
    loaded = load_config(path, environ=env, overrides={"max_workers": 7})
    cfg = loaded.config
    assert cfg.max_workers == 7 and loaded.sources["max_workers"] == "flag"
    assert cfg.limits.cpu_seconds == 22 and loaded.sources["limits.cpu_seconds"] == "env"
    assert cfg.limits.open_files == 99 and loaded.sources["limits.open_files"] == "file"
    assert cfg.min_idle == 2 and loaded.sources["min_idle"] == "file"
    assert loaded.sources["request_timeout"] == "default"


def test_default_path_is_optional_but_explicit_path_must_exist(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert load_config(environ=env).path is None
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", environ=env)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"SANDBOX_MAX_WORKERS": "many"}, "max_workers"),
        ({"SANDBOX_MAX_WORKERS": "0"}, "max_workers"),
        ({"SANDBOX_PROFILE": "docker"}, "profile"),
        ({"SANDBOX_LIMITS__OPEN_FILES": "-1"}, "limits.open_files"),
        ({"SANDBOX_WORKSPACE_ROOT": "relative/dir"}, "workspace_root"),
        ({"SANDBOX_MIN_IDLE": "50"}, "min_idle"),
        ({"SANDBOX_ENV__ALLOW": "PATH,bad name"}, "env.allow"),
        ({"SANDBOX_MODEL__BASE_URL": "ftp://x"}, "model.base_url"),
        ({"SANDBOX_SERVICE__RUN_BUFFER_MB": "0"}, "service.run_buffer_mb"),
        ({"SANDBOX_SERVICE__RUN_TTL": "0"}, "service.run_ttl"),
        ({"SANDBOX_SERVICE__MAX_RUNS_PER_USER": "-1"}, "service.max_runs_per_user"),
        ({"SANDBOX_SERVICE__MAX_BODY_MB": "lots"}, "service.max_body_mb"),
        ({"SANDBOX_SERVICE__SLOW_CLIENT_SECONDS": "0"}, "service.slow_client_seconds"),
    ],
)
def test_invalid_value_names_the_field(env: dict[str, str], field: str, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), **env}
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    assert info.value.field == field


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_wrokers = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.field == "max_wrokers"


def test_unknown_sandbox_variable_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "SANDBOX_LIMITS__CPU_SECOND": "3"}
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    assert info.value.field == "SANDBOX_LIMITS__CPU_SECOND"
    assert "did you mean SANDBOX_LIMITS__CPU_SECONDS?" in info.value.message


def test_client_variables_are_not_settings(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "SANDBOX_URL": "unix:/x", "SANDBOX_TOKEN": "t",
           "SANDBOX_TOKEN_FILE": "/t", "SANDBOX_AUDIT_CANARY": "c"}  # fmt: skip
    assert load_config(environ=env).config.max_workers == 8


def test_errors_name_the_file_line_or_variable_they_came_from(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("# pool\nmax_workers = 4\n\n[limits]\nopen_files = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.field == "limits.open_files" and info.value.source == f"in {path} line 5"
    assert f"(set in {path} line 5)" in info.value.message
    path.write_text("max_workers = 'many'\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_config(path, environ={})
    path.write_text("min_idle = 9\n")  # a check across settings (min_idle > max_workers) names it too
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.field == "min_idle" and info.value.source == f"in {path} line 1"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"SANDBOX_MIN_IDLE": "50"})
    assert info.value.source == "by SANDBOX_MIN_IDLE"
    path.write_text("[strict]\nro_bindz = []\n")
    with pytest.raises(ConfigError, match=r"unknown setting \(set in .* line 2\)"):
        load_config(path, environ={})


def test_origins_say_where_each_value_was_set(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[limits]\nprocesses = 50\n")
    loaded = load_config(path, environ={"SANDBOX_MAX_WORKERS": "3"}, overrides={"profile": "process"})
    assert loaded.origins["limits.processes"] == f"{path} line 2"
    assert loaded.origins["max_workers"] == "SANDBOX_MAX_WORKERS"
    assert loaded.origins["profile"] == "flag"
    assert "min_idle" not in loaded.origins


def test_api_key_from_anthropic_variable_is_secret(tmp_path: Path) -> None:
    cfg = load_config(environ={"XDG_CONFIG_HOME": str(tmp_path), "ANTHROPIC_API_KEY": "sk-real"}).config
    assert isinstance(cfg.model.api_key, Secret) and cfg.model.api_key == "sk-real"
    assert "sk-real" not in repr(cfg)


@pytest.mark.parametrize("bad", ["../x", "/etc", ".", "..", "", "a/b", "-rf", "x" * 65, "a b", "é"])
def test_user_ids_cannot_name_other_paths(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_user_id(bad)
    assert info.value.field == "user_id"


def test_workspace_is_below_root() -> None:
    cfg = ProcessSandboxConfig(workspace_root=Path("/srv/ws"))
    assert cfg.workspace_for("alice") == Path("/srv/ws/alice")
    with pytest.raises(ConfigError):
        cfg.workspace_for("../alice")


def test_env_allowlist_exact_names_and_operator_patterns() -> None:
    host = {"PATH": "/bin", "LANG": "C", "AWS_SECRET": "s", "LC_NUMERIC": "x", "DATABASE_URL": "pg://"}
    env = worker_env(ProcessSandboxConfig(), "/ws", host)
    assert env == {"PATH": "/bin", "LANG": "C", "HOME": "/ws"}
    cfg = ProcessSandboxConfig().replace(
        env=ProcessSandboxConfig().env.__class__(allow=("LC_*",), fixed={"FOO": "bar"})
    )
    env = worker_env(cfg, "/ws", host)
    assert env["LC_NUMERIC"] == "x" and env["FOO"] == "bar" and "AWS_SECRET" not in env
    assert env["PATH"] == cfg.env.default_path

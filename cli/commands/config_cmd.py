"""``sandbox config show``: the effective configuration and where each value came from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output
from cli.commands.common import effective_config, state_of
from cli.state import effective_provider

if TYPE_CHECKING:
    from sandbox_core.config import LoadedConfig

REDACTED = "***"

config_app = typer.Typer(name="config", help="Inspect the configuration.", no_args_is_help=True)


def plain(value: Any) -> Any:
    """A config value as JSON-able data, with secrets redacted."""
    from sandbox_core.config import Secret

    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def describe(loaded: LoadedConfig) -> dict[str, Any]:
    """Every dotted key with its value and source, plus the file used."""
    from sandbox_core.config import flat_values

    values = flat_values(loaded.config)
    return {
        "path": str(loaded.path) if loaded.path is not None else None,
        "effective_provider": effective_provider(loaded.config),
        "values": {key: {"value": plain(values[key]), "source": loaded.sources.get(key, "default"),
                         **({"origin": loaded.origins[key]} if key in loaded.origins else {})}
                   for key in sorted(values)},
    }


_SOURCE_STYLE = {"default": "dim", "file": "cyan", "env": "yellow", "flag": "magenta"}


@config_app.command("show")
def show_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print as JSON: {path, values: {key: {value, source, origin?}}}.")
                       ] = False,
) -> None:
    """Show the effective configuration: each value and its source (default, file, env, flag),
    with the file line or variable that set it.

    Secrets (the API key) are redacted. Precedence: default < file < env < flag.
    """
    import json

    from rich.table import Table
    from rich.text import Text

    state = state_of(ctx)
    effective_config(state, warn=False)
    info = describe(state.loaded())
    if state.json_output(as_json):
        output.print_json(info)
        return
    console = output.console()
    table = Table(title=f"config file: {info['path'] or 'none (defaults, environment and flags)'}",
                  title_justify="left")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("source")
    for key, row in info["values"].items():
        value = row["value"]
        shown = "–" if value is None else value if isinstance(value, str) else json.dumps(value)
        if key == "model.provider" and value == "auto":
            shown += f" (→ {info['effective_provider']})"
        source = row["source"] + (f" ({row['origin']})" if row.get("origin") and row["origin"] != "flag" else "")
        table.add_row(key, Text(shown), Text(source, style=_SOURCE_STYLE.get(row["source"], "")))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app)

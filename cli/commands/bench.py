"""``sandbox bench``: the benchmark suite, with a progress bar and a results table."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.commands.common import ProfileName, effective_config, state_of
from cli.runtime import report

if TYPE_CHECKING:
    from rich.console import Console

    from sandbox_core.bench import Figure


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A progress callback: a live bar on a terminal, plain lines on stderr otherwise."""
    err = output.console(stderr=True)
    if not err.is_interactive:
        yield lambda name: err.print(f"bench: {name}…", style="dim")
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("starting", total=total)
            started = False

            def step(name: str) -> None:
                nonlocal started
                if started:
                    bar.advance(task)
                started = True
                bar.update(task, description=name)

            yield step
            bar.update(task, completed=total)


def render_figures(figures: list[Figure], console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="benchmark", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("verdict")
    table.add_column("detail", overflow="fold")
    for f in figures:
        verdict = Text("–") if f.ok is None else Text("PASS", style="green") if f.ok else Text("MISS", style="red")
        table.add_row(
            f.name,
            f"{f.value:g} {f.unit}",
            f.target or "–",
            "–" if f.baseline is None else f"{f.baseline:g} ms",
            "–" if f.ratio is None else f"{f.ratio:g}x",
            verdict,
            " ".join(f"{k}={v}" for k, v in f.detail.items()),
        )
    console.print(table)


def bench_command(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer samples (a few seconds).")] = False,
    profile: Annotated[ProfileName | None, typer.Option("--profile", help="Isolation profile.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Run the benchmark suite: cold start, warm claim, ping vs a raw pipe, exec, idle memory.

    Each figure is shown with its target and, where it has one, the baseline measured in the
    same run and the ratio to it (ratios are what compare across machines).
    """
    from sandbox_core import bench
    from sandbox_core.errors import SandboxError

    state = state_of(ctx)
    config = effective_config(state, profile)
    json_mode = state.json_output(as_json)
    steps = len(bench.suite(config, quick))
    try:
        with _progress(steps) as progress:
            figures = asyncio.run(bench.run_suite(config, quick, progress))
    except SandboxError as exc:
        raise typer.Exit(report(exc, verbose=state.verbose)) from None
    except KeyboardInterrupt:
        raise typer.Exit(output.EXIT_INTERRUPTED) from None
    if json_mode:
        output.print_json([f.to_dict() for f in figures])
    else:
        render_figures(figures, output.console())


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)

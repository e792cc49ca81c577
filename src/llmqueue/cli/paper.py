"""``llmqueue reproduce``: the paper's claims, checked and drawn (figures and a markdown report),
and Fig. 1 against a real engine."""

from __future__ import annotations

import sys
import time

import click
from rich.table import Table

from llmqueue.cli.common import _check_writable, _console
from llmqueue.errors import ConfigError
from llmqueue.paper import TARGETS


@click.command("reproduce")
@click.argument("name", type=click.Choice([*TARGETS, "all"]))
@click.option("--out", "out_dir", default="reproduce", show_default=True,
              help="Folder for the PNG figures and the markdown report.")
@click.option("--quick", is_flag=True, help="Fewer requests per run (a quick look, not the report).")
@click.option("--real", is_flag=True,
              help="fig1 only: set llmqueue's prediction against the real-engine runs on one H200 "
              "(DATA_DIR/gpu/engine_fig1); exits 0 whenever the comparison ran.")
@click.option("--data-dir", "data_dir", default="../shared/data", show_default=True,
              help="With --real: the project's shared data.")
@click.option("--progress/--no-progress", default=None,
              help="Say which target runs, on stderr (default: when stderr is a terminal).")
def reproduce_cmd(name: str, out_dir: str, quick: bool, real: bool, data_dir: str,
                  progress: bool | None) -> None:
    """Reproduce the paper: fig1 | example | theorem | vertex-c | all (figures + a markdown report).

    Exits with code 1 if a claim of the paper does not hold in the measurement (not with --real,
    which compares with a real engine and reports each agreement).
    """
    from llmqueue.paper.realfig1 import reproduce_real
    from llmqueue.paper.reproduce import reproduce

    if real and name != "fig1":
        raise ConfigError("real", name, "--real is for fig1 only")
    _check_writable(out_dir, "--out", folder=True)
    started = time.perf_counter()

    def say(target: str, i: int, n: int) -> None:
        if not (progress if progress is not None else sys.stderr.isatty()):
            return
        click.echo(f"llmqueue: reproducing {target} ({i + 1} of {n}; {time.perf_counter() - started:.0f} s "
                   "so far)...", err=True)

    if real:
        say("fig1 against the real engine", 0, 1)
        report = reproduce_real(out_dir, data_dir, quick=quick)
    else:
        report = reproduce(name, out_dir, quick=quick, on_target=say)
    console = _console()
    table = Table(show_header=True, header_style="bold")
    table.add_column("claim")
    table.add_column("agrees" if real else "holds", justify="center")
    for claim, holds in report.claims:
        table.add_row(claim, "yes" if holds else "[bold red]NO[/]")
    console.print(table)
    for path in report.files:
        console.print(f"wrote {path}")
    if not real and not report.all_hold:
        raise click.exceptions.Exit(1)

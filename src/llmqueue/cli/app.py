"""The ``llmqueue`` command line assembled: the group with ``simulate``, ``compare``, ``capacity``,
``region``, ``sweep``, ``results``, ``reproduce``, ``network analyze|simulate|split``, ``plan``, ``fit``,
``trace stats|fit``, ``validate``, ``warmup`` and ``profile`` (one module per command family), and
``main``.

Every option can also come from a TOML or YAML file given with ``--config`` (keys are the option
names; flags on the command line win). Bad input exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from llmqueue.cli.capacity import capacity_cmd, region_cmd
from llmqueue.cli.data import fit_cmd, trace_group, validate_cmd, warmup_cmd
from llmqueue.cli.gpuprofile import profile_cmd
from llmqueue.cli.network import network_group
from llmqueue.cli.paper import reproduce_cmd
from llmqueue.cli.plan import plan_cmd
from llmqueue.cli.run import compare_cmd, simulate_cmd
from llmqueue.cli.split import split_cmd
from llmqueue.cli.sweep import results_cmd, sweep_cmd
from llmqueue.errors import LLMQueueError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llmqueue")
def cli() -> None:
    """Queueing theory of LLM serving: capacity, stability and latency of batch schedulers."""


for _command in (simulate_cmd, compare_cmd, capacity_cmd, region_cmd, sweep_cmd, results_cmd, reproduce_cmd,
                 network_group, plan_cmd, fit_cmd, trace_group, validate_cmd, warmup_cmd, profile_cmd):
    cli.add_command(_command)
network_group.add_command(split_cmd)


_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""Raised for a bare group since click 8.2 (before, the group prints its help and exits 0 itself)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI; bad input gives one line on stderr and exit code 2."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
        if isinstance(code, int):  # click returns the code of an Exit in this mode
            return code
    except _NO_ARGS_IS_HELP as err:
        click.echo(err.ctx.get_help() if err.ctx else str(err))
        return 0
    except click.UsageError as err:
        click.echo(f"llmqueue: error: {err.format_message()}", err=True)
        return 2
    except LLMQueueError as err:
        click.echo(f"llmqueue: error: {err}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("llmqueue: aborted", err=True)
        return 1
    except click.ClickException as err:
        click.echo(f"llmqueue: error: {err.format_message()}", err=True)
        return err.exit_code
    except OSError as err:
        click.echo(f"llmqueue: error: {err.filename or ''}: {err.strerror}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line: parse, call the library, render (``llmqueue.cli.app`` assembles the commands)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmqueue`` command (imports the commands only when called)."""
    from llmqueue.cli.app import main as run

    return run(argv)

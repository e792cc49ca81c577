"""matplotlib, imported only when a figure is drawn (it is the optional ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmqueue.errors import ConfigError
from llmqueue.io.fileio import atomic_write


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or ConfigError when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plot", None, "needs matplotlib: pip install 'llmqueue[plot]'") from None
    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write as PNG (120 dpi, atomically: a killed run leaves the old file) and close
    ``fig``; returns the path."""
    plt = pyplot()
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as out:
            fig.savefig(out, dpi=120, format="png")
    finally:
        plt.close(fig)
    return Path(path)

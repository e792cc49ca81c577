"""Numbers as text: the one rule for spec strings and the one rule for tables.

:func:`format_number` writes the canonical text of a parameter in a spec string (``poisson:129``,
``linear:c=1.5,a=0.25``): the shortest text that parses back to the same float, so that a spec
printed and read again gives the same model. :func:`format_amount` writes a measured quantity in a
table or report (thousands separators, fixed decimals, ``-`` where there is no number).
"""

from __future__ import annotations

import math
from numbers import Real

__all__ = ["format_amount", "format_number"]

_EXACT_INTEGERS = 1e16
"""Integral values below this magnitude are written without '.0' or an exponent (every float
there is printed as its exact integer, which reads back as the same float)."""


def format_number(x: float) -> str:
    """Shortest text that reads back as exactly ``x`` (integral values without '.0').

    ``129.0`` -> ``129``, ``0.1`` -> ``0.1``, ``1e20`` -> ``1e+20``, ``inf`` -> ``inf``. Spec
    strings use it, so ``float(format_number(x)) == x`` for every finite ``x`` is what makes them
    round-trip.
    """
    value = float(x)
    if value.is_integer() and abs(value) < _EXACT_INTEGERS:
        return str(int(value))
    return repr(value)


def format_amount(x: object, digits: int = 0) -> str:
    """A quantity for a table: ``1,234.5`` (``digits`` decimals, thousands separators); ``-`` for
    None, NaN or an infinity, where a table cell has no number to show."""
    if x is None or (isinstance(x, Real) and not isinstance(x, bool) and not math.isfinite(x)):
        return "-"
    if isinstance(x, Real) and not isinstance(x, bool):
        return f"{float(x):,.{digits}f}"
    return str(x)

"""Reading TOML/YAML configuration files, ``key=value`` spec strings, and pydantic's errors as
one ConfigError line.

Shared by the CLI's ``--config``, sweep files, network files and the spec parsers (batch times,
memory), so every input is read and every error is worded the same way.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llmqueue.errors import ConfigError


def read_table(path: str | Path, field: str) -> Any:
    """The parsed content of a ``.toml``, ``.yaml`` or ``.yml`` file; errors name ``field``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(field, str(path), "must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(field, str(path), f"cannot be read: {err.strerror}") from None
    except UnicodeDecodeError as err:  # a binary file, or another encoding than UTF-8
        raise ConfigError(field, str(path), f"is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                          f"offset {err.start})") from None
    try:
        return tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(field, str(path), f"is not valid: {first}") from None
    except RecursionError:  # nesting deeper than the parser's recursion limit
        raise ConfigError(field, str(path), "is not valid: nested too deeply") from None


def _is_type_tag(part: object) -> bool:
    """Whether a pydantic error location part is a type's tag (``str``, ``list[...]``), not a key."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or part.startswith(("list[", "dict[", "function-"))
    )


def _is_tag(part: object) -> bool:
    """Whether a location part can be a union branch's tag: a type's, or a model's class name."""
    return _is_type_tag(part) or (isinstance(part, str) and part[:1].isupper())


def _branches(errors: list[Any], loc: tuple[Any, ...], at: int) -> list[Any]:
    """The errors of the other branches of a union at ``loc[:at]`` (another tag at ``at``; one of
    the tags a type's, so that keys such as engine names are never taken for tags)."""
    others = [e for e in errors if len(e["loc"]) > at and tuple(e["loc"][:at]) == loc[:at]
              and e["loc"][at] != loc[at] and _is_tag(e["loc"][at])]
    if not _is_tag(loc[at]) or not any(_is_type_tag(t) for t in (loc[at], *(e["loc"][at] for e in others))):
        return []
    return others


def first_error(err: ValidationError, prefix: str = "") -> ConfigError:
    """The first pydantic error as a ConfigError naming the key path (after ``prefix``).

    An unknown key comes first when there is one: it is usually a typo of a missing key. A value
    of a union (``str | Table``, ``list | Span``) that fits no branch gives one error per branch:
    the deepest one is inside the branch the value was meant for (``k_p: must be <= ...`` rather
    than ``should be a valid string``), and branch tags are left out of the key path.
    """
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    if first["type"] != "extra_forbidden" and loc and _is_tag(loc[-1]):
        deeper = [e for e in _branches(errors, loc, len(loc) - 1) if len(e["loc"]) > len(loc)]
        if deeper:
            first = max(deeper, key=lambda e: len(e["loc"]))
            loc = tuple(first["loc"])
    parts = [p for i, p in enumerate(loc)
             if not (_is_tag(p) and (str(p).startswith(("function-", "list[")) or _branches(errors, loc, i)))]
    path = ".".join(str(p) for p in parts)
    problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    field = f"{prefix}: {path}" if prefix and path else (path or prefix or "config")
    return ConfigError(field, first.get("input"), problem)


def split_pair(item: str) -> tuple[str, str] | None:
    """``key=value`` as (key, value), both stripped; None for an item without '=' or without a key.
    The one rule for a single item: :func:`split_items` uses it, and so do options that take one
    ``COLUMN=VALUE`` per use (``--where``)."""
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not key:
        return None
    return key, value.strip()


def split_items(spec: str, body: str, field: str, *, keys: Sequence[str] | None = None,
                positional: bool = False, lower: bool = False) -> tuple[list[str], dict[str, str]]:
    """``a,b,k=v,k=v`` (the part ``body`` of ``spec``) as (positional values, {key: value}).

    The one splitter of ``key=value`` lists (batch-time, memory, size, arrival and profile specs,
    fit's ``--columns``). Items are split at ',' and stripped; ``lower`` lowercases keys. A
    ConfigError on ``field`` with ``spec`` as the value for: an empty item, an item without '='
    (unless ``positional``: then values without a key, all before the first ``key=value``), a key
    not in ``keys`` (when given), a key given twice. An empty ``body`` is no items.
    """
    values: list[str] = []
    named: dict[str, str] = {}
    if not body.strip():
        return values, named
    for item in body.split(","):
        text = item.strip()
        if not text:
            raise ConfigError(field, spec, "empty parameter in spec")
        pair = split_pair(text)
        if pair is None:
            if not positional or "=" in text:
                raise ConfigError(field, spec, f"expected key=value, found {text!r}")
            if named:
                raise ConfigError(field, spec, "positional parameters must come before key=value ones")
            values.append(text)
            continue
        key, value = pair
        key = key.lower() if lower else key
        if keys is not None and key not in keys:
            raise ConfigError(field, spec, f"unknown parameter '{key}' (expected one of: {', '.join(keys)})")
        if key in named:
            raise ConfigError(field, spec, f"duplicate key {key!r}")
        named[key] = value
    return values, named

"""Reading TOML/YAML configuration files, ``key=value`` spec strings, and pydantic's errors as
one ConfigError line.

Shared by the CLI's ``--config``, sweep files, network files and the spec parsers (batch times,
memory), so every input is read and every error is worded the same way.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llmqueue.errors import ConfigError


def read_table(path: str | Path, field: str) -> Any:
    """The parsed content of a ``.toml``, ``.yaml`` or ``.yml`` file; errors name ``field``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(field, str(path), f"cannot be read: {err.strerror}") from None
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(field, str(path), "must end in .toml, .yaml or .yml")
    try:
        return tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(field, str(path), f"is not valid: {str(err).splitlines()[0]}") from None


def first_error(err: ValidationError, prefix: str = "") -> ConfigError:
    """The first pydantic error as a ConfigError naming the key path (after ``prefix``).

    An unknown key comes first when there is one: it is usually a typo of a missing key.
    """
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "list[")))
    problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    field = f"{prefix}: {loc}" if prefix and loc else (loc or prefix or "config")
    return ConfigError(field, first.get("input"), problem)


def split_items(spec: str, body: str, field: str) -> list[tuple[str, str]]:
    """``k=v,k=v`` (the part ``body`` of ``spec``) as (key, value) pairs; ConfigError on
    ``field`` for an item without '=' or a repeated key."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ConfigError(field, spec, f"expected key=value, found {item.strip()!r}")
        if key in seen:
            raise ConfigError(field, spec, f"duplicate key {key!r}")
        seen.add(key)
        pairs.append((key, value))
    return pairs

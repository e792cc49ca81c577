"""Request logs of real engine runs: what was sent, when, and what the engine measured.

The JSONL log of vLLM's benchmark tooling has one object per request with ``input_toks``,
``output_toks``, ``arrival_time`` (client wall clock, s) and the engine's monotonic timestamps
``queued_ts``, ``scheduled_ts``, ``first_token_ts``, ``last_token_ts`` (s). The two clocks differ
by an unknown offset; we put arrivals on the engine clock with the smallest observed
``queued_ts - arrival_time`` (the fastest hand-over counts as instantaneous), so arrival gaps
stay exactly as the client sent them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from llmqueue.errors import ConfigError

__all__ = ["RunLog", "read_vllm_log"]

_VLLM_KEYS = ("input_toks", "output_toks", "arrival_time", "queued_ts", "first_token_ts",
              "last_token_ts")


@dataclass(frozen=True, slots=True, eq=False)
class RunLog:
    """One real run, per request (arrays in arrival order, times in ms from the first arrival).

    ``first_token_ms`` / ``finish_ms`` are NaN for requests that never got there.
    """

    path: str
    request_ids: tuple[str, ...]
    arrival_ms: np.ndarray
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray
    first_token_ms: np.ndarray
    finish_ms: np.ndarray

    def __len__(self) -> int:
        return int(self.arrival_ms.shape[0])

    @property
    def ttft_ms(self) -> np.ndarray:
        """Time to first token per request."""
        return self.first_token_ms - self.arrival_ms

    @property
    def e2el_ms(self) -> np.ndarray:
        """End-to-end latency per request."""
        return self.finish_ms - self.arrival_ms

    @property
    def tpot_ms(self) -> np.ndarray:
        """Time per output token after the first (vLLM's definition); NaN for one-token outputs."""
        gaps = (self.decode_tokens - 1).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gaps > 0, (self.finish_ms - self.first_token_ms) / gaps, np.nan)


def _value(obj: dict, key: str, line: int, path: str, field: str) -> float:
    if key not in obj:
        raise ConfigError(field, path, f"line {line}: missing key '{key}'")
    value = obj[key]
    if value is None and key in ("first_token_ts", "last_token_ts"):
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(field, path, f"line {line}: '{key}' must be a finite number, found {value!r}")
    return float(value)


def read_vllm_log(path: str, field: str = "run-log") -> RunLog:
    """Read a vLLM benchmark JSONL request log (see the module docstring); requests are sorted by
    arrival. Errors name the file, the line and the key."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ConfigError(field, path, "run log file not found")
    ids: list[str] = []
    rows: list[list[float]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(field, path, f"line {number}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(field, path, f"line {number}: expected a JSON object")
                row = [_value(obj, key, number, path, field) for key in _VLLM_KEYS]
                for key, value in zip(_VLLM_KEYS[:2], row[:2], strict=True):
                    if value < 0 or not value.is_integer():
                        raise ConfigError(field, path, f"line {number}: '{key}' must be a "
                                                       f"token count >= 0, found {value:g}")
                if row[0] + row[1] < 1:
                    raise ConfigError(field, path, f"line {number}: request has no tokens")
                ids.append(str(obj.get("request_id", f"line-{number}")))
                rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field, path, f"cannot read run log: {exc}") from None
    if not rows:
        raise ConfigError(field, path, "run log holds no requests")
    data = np.array(rows, dtype=float)
    order = np.argsort(data[:, 2], kind="stable")
    data = data[order]
    offset_s = float(np.min(data[:, 3] - data[:, 2]))
    arrival_engine_s = data[:, 2] + offset_s
    origin_s = float(arrival_engine_s[0])

    def ms(column: np.ndarray) -> np.ndarray:
        return (column - origin_s) * 1000.0

    return RunLog(
        path=path,
        request_ids=tuple(ids[i] for i in order),
        arrival_ms=ms(arrival_engine_s),
        prefill_tokens=data[:, 0].astype(np.int64),
        decode_tokens=data[:, 1].astype(np.int64),
        first_token_ms=ms(data[:, 4]),
        finish_ms=ms(data[:, 5]),
    )

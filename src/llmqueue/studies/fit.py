"""Calibrated batch times: fit t(n) and composition-aware models to measured iteration times.

Readers turn each data set into samples (a :class:`~llmqueue.model.batchtime.BatchShape` and its measured
ms): the Splitwise profiles (Llama-2-70B, BLOOM-176B on A100/H100), this project's H200
measurement and a user's CSV. :func:`fit_data` fits the token-only candidates (piecewise with a
scanned knee, staircase, linear) and the composition model, and scores each (R^2, RMSE, largest
relative error). Least squares on the ms themselves, as the paper and data/gpu fit them.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import split_pair
from llmqueue.io.tables import CsvTable, read_csv_table
from llmqueue.model.batchtime import (
    BatchShape,
    BatchTime,
    CompositionTime,
    LinearTime,
    StaircaseTime,
    _nnls_line,
    _r_squared,
    fit_piecewise,
    fit_staircase,
)
from llmqueue.model.presets import FIT_DATE, Preset

__all__ = [
    "BATCH_TIME_COLUMNS",
    "COMPOSITION_TERMS",
    "DATA_SETS",
    "FIT_DATE",
    "DataFit",
    "FitData",
    "ModelFit",
    "fit_composition",
    "fit_data",
    "goodness",
    "is_batch_times",
    "load_data",
    "parse_columns",
    "parse_filters",
    "plot_fit",
    "presets_from",
    "read_batch_times",
    "read_csv",
    "read_h200",
    "read_splitwise",
]

SPLITWISE_FILE = "profiles/splitwise_perf_model.csv"
H200_FILE = "gpu/batch_times_h200.csv"
DATA_SETS: dict[str, str] = {"splitwise": SPLITWISE_FILE, "h200": H200_FILE}
"""Named data sets and their files under the data directory (``../shared/data``)."""

COMPOSITION_TERMS = ("c", "prefill", "decode", "kv", "chunk", "logit")
"""The linear terms of :class:`~llmqueue.model.batchtime.CompositionTime`, in fitting order."""

TOKEN_KINDS = ("piecewise", "staircase", "linear")
MIN_ROWS = 3
"""Fewest samples a fit accepts (the piecewise model has three parameters)."""

# Splitwise rows that measured something else than the iteration they name (see _splitwise_group).
_SPLITWISE_EXCLUDED: dict[tuple[str, str, int], str] = {
    ("llama2-70b", "2", 64): (
        "batch_size=64 at TP2, where prompt_time drops 8x from batch 32 while e2e_time rises 8-9x "
        "(the 64 prompts did not run as one batch)"
    ),
}
_HARDWARE_NAMES = {"a100-80gb": "a100", "h100-80gb": "h100", "h100-80gb-pcap": "h100-pcap"}

USER_COLUMNS = ("time_ms", "n_tokens", "prefill_tokens", "decode_tokens", "decode_kv_tokens",
                "chunks", "logit_rows")
"""Column names a user CSV may have (rename others with ``columns``)."""


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class FitData:
    """Measured batches of one engine setting and where they come from.

    ``shapes`` is None for token-count-only data (no composition fit then). ``rows`` says which
    rows of ``source`` were used and how they were reduced.
    """

    name: str
    n_tokens: tuple[int, ...]
    time_ms: tuple[float, ...]
    shapes: tuple[BatchShape, ...] | None
    source: str
    rows: str

    def features(self) -> np.ndarray:
        """The composition design matrix: one row per sample, columns :data:`COMPOSITION_TERMS`."""
        if self.shapes is None:
            raise ConfigError("data", self.name, "has token counts only, no batch shapes")
        return _features(self.shapes)


def _features(shapes: Sequence[BatchShape]) -> np.ndarray:
    """Design matrix of :data:`COMPOSITION_TERMS` for ``shapes``."""
    return np.array(
        [[1.0, s.prefill_tokens, s.decode_tokens, s.decode_kv_tokens, len(s.chunk_tokens), s.logit_rows]
         for s in shapes],
        dtype=float,
    )


def _even_chunks(tokens: int, chunks: int) -> tuple[int, ...]:
    """``tokens`` split into ``chunks`` near-equal parts (the first ones one larger)."""
    if chunks == 0:
        return ()
    return tuple(tokens // chunks + (1 if i < tokens % chunks else 0) for i in range(chunks))


def _read_rows(path: Path) -> CsvTable:
    """The CSV at ``path`` by the shared table reader (errors on ``data`` name the file, and a
    cell's line and column)."""
    return read_csv_table(path, "data")


def read_splitwise(path: str | Path) -> list[FitData]:
    """One :class:`FitData` per (model, hardware, tensor_parallel) of the Splitwise profile CSV.

    Prefill samples: ``batch_size`` prompts of ``prompt_size`` tokens (that many chunks and logit
    rows), median ``prompt_time`` over every row of that (prompt_size, batch_size). Decode
    samples: ``batch_size`` decoders, median ``token_time`` per (prompt, batch, token_size).
    ``token_time`` is the mean decode iteration over a generation (``e2e_time = prompt_time +
    (g - 1) * token_time``, ``g`` tokens generated), so each decoder reads ``prompt_size + g/2``
    KV entries on average; ``g`` is that relation solved per row (median), at most
    ``token_size`` (it equals it up to 512 tokens; longer runs stopped early).
    """
    path = Path(path)
    table = _read_rows(path)
    table.require(("model", "hardware", "tensor_parallel", "prompt_size", "batch_size", "token_size",
                   "prompt_time", "token_time", "e2e_time"))
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, row in enumerate(table.rows):
        groups[(row["model"], row["hardware"], row["tensor_parallel"])].append(i)
    return [_splitwise_group(key, members, table) for key, members in groups.items()]


def _splitwise_group(
    key: tuple[str, str, str], members: list[int], table: CsvTable
) -> FitData:
    model, hardware, tp = key
    prefill: dict[tuple[int, int], list[float]] = defaultdict(list)
    decode: dict[tuple[int, int, int], list[tuple[float, float]]] = defaultdict(list)
    excluded = 0
    notes: list[str] = []
    for i in members:
        p, b, d = (table.count(i, c) for c in ("prompt_size", "batch_size", "token_size"))
        if p < 1 or b < 1 or d < 2:
            raise table.cell_error(i, "prompt_size", f"(batch_size {b}, token_size {d}) breaks prompt_size "
                                   ">= 1, batch_size >= 1, token_size >= 2")
        reason = _SPLITWISE_EXCLUDED.get((model, tp, b))
        if reason is not None:
            excluded += 1
            if reason not in notes:
                notes.append(reason)
            continue
        prompt_ms, token_ms, e2e_ms = (table.number(i, c) for c in ("prompt_time", "token_time", "e2e_time"))
        prefill[(p, b)].append(prompt_ms)
        generated = min(d, 1 + round((e2e_ms - prompt_ms) / token_ms)) if token_ms > 0 else d
        decode[(p, b, d)].append((token_ms, max(2, generated)))
    shapes: list[BatchShape] = []
    times: list[float] = []
    for (p, b), values in sorted(prefill.items()):
        shapes.append(BatchShape(prefill_tokens=p * b, decode_tokens=0, chunk_tokens=(p,) * b,
                                 chunk_prefix_tokens=(0,) * b, logit_rows=b))
        times.append(float(statistics.median(values)))
    for (p, b, _), values in sorted(decode.items()):
        generated = float(statistics.median(g for _, g in values))
        shapes.append(BatchShape(prefill_tokens=0, decode_tokens=b,
                                 decode_kv_tokens=math.floor(b * (p + generated / 2)), logit_rows=b))
        times.append(float(statistics.median(t for t, _ in values)))
    name = f"{_HARDWARE_NAMES.get(hardware, hardware)}-{model}-tp{tp}"
    used = len(members) - excluded
    rows = (f"model={model}, hardware={hardware}, tensor_parallel={tp}: {used} rows -> "
            f"{len(prefill)} prefill + {len(decode)} decode medians")
    if notes:
        rows += f"; {excluded} rows excluded: {'; '.join(notes)}"
    return FitData(name, tuple(s.tokens for s in shapes), tuple(times), tuple(shapes),
                   f"data/{SPLITWISE_FILE}", rows)


BATCH_TIME_COLUMNS = ("model", "mode", "n_prefill_tokens", "n_decode_tokens", "decode_context",
                      "prefill_context", "median_ms")
"""Columns of a batch-times table (the H200 measurement's format, which ``llmqueue profile`` writes)."""


def _batch_time_shape(table: CsvTable, i: int) -> BatchShape:
    """Row ``i`` of a batch-times table as a shape: one chunk of ``n_prefill_tokens`` after
    ``prefill_context`` cached tokens (its last token through the LM head) and ``n_decode_tokens``
    decoders reading ``decode_context`` entries each."""
    pre, dec, ctx, prefix = (table.count(i, c) for c in
                             ("n_prefill_tokens", "n_decode_tokens", "decode_context", "prefill_context"))
    if pre + dec < 1:
        raise table.cell_error(i, "n_prefill_tokens", "leaves a batch of 0 tokens (a batch needs at least 1)")
    chunks = (pre,) if pre > 0 else ()
    return BatchShape(prefill_tokens=pre, decode_tokens=dec, chunk_tokens=chunks,
                      chunk_prefix_tokens=(prefix,) * len(chunks), decode_kv_tokens=dec * ctx,
                      logit_rows=dec + len(chunks))


def _batch_time_groups(table: CsvTable, modes: Sequence[str] | None) -> dict[tuple[str, str], tuple[
        list[BatchShape], list[float]]]:
    """Shapes and median times of a batch-times table per (model, mode), ``modes`` only if given."""
    table.require(BATCH_TIME_COLUMNS)
    groups: dict[tuple[str, str], tuple[list[BatchShape], list[float]]] = {}
    for i, row in enumerate(table.rows):
        if modes is not None and row["mode"] not in modes:
            continue
        time_ms = table.number(i, "median_ms")
        if time_ms <= 0:
            raise table.cell_error(i, "median_ms", "must be > 0")
        shapes, times = groups.setdefault((row["model"], row["mode"]), ([], []))
        shapes.append(_batch_time_shape(table, i))
        times.append(time_ms)
    return groups


def read_h200(path: str | Path) -> list[FitData]:
    """One :class:`FitData` per model of the H200 measurement, CUDA-graph rows, median times.

    Each row is one chunk of ``n_prefill_tokens`` (prefix ``prefill_context``) and
    ``n_decode_tokens`` decoders reading ``decode_context`` entries each. The run applied the LM
    head to the chunk's last token in every row (mixed ones too), so the chunk counts as ending
    its prompt: logit rows = decoders + 1 with a chunk.
    """
    groups = _batch_time_groups(_read_rows(Path(path)), ("graph",))
    return [
        FitData(f"h200-{model}", tuple(s.tokens for s in shapes), tuple(times), tuple(shapes),
                f"data/{H200_FILE}", f"model={model}, mode=graph: {len(times)} rows (median_ms)")
        for (model, _), (shapes, times) in groups.items()
    ]


def read_batch_times(path: str | Path, where: Mapping[str, str] | None = None) -> list[FitData]:
    """One :class:`FitData` per (model, mode) of a batch-times table (``llmqueue profile``'s CSV, or
    the H200 measurement's format), median times, rows as in :func:`read_h200`; named
    ``MODEL-MODE``. ``where`` keeps the rows whose column equals the value."""
    path = Path(path)
    table = _read_rows(path)
    for key in where or {}:
        if key not in table.columns:
            raise ConfigError("where", key, f"{path.name} has no such column")
    table = table.where(where or {})
    groups = _batch_time_groups(table, None)
    if not groups:
        raise ConfigError("where", dict(where or {}), f"no rows of {path.name} match")
    rest = {k: v for k, v in (where or {}).items() if k not in ("model", "mode")}
    return [
        FitData(f"{model}-{mode}", tuple(s.tokens for s in shapes), tuple(times), tuple(shapes), str(path),
                ", ".join(f"{k}={v}" for k, v in {"model": model, "mode": mode, **rest}.items())
                + f": {len(times)} rows (median_ms)")
        for (model, mode), (shapes, times) in groups.items()
    ]


def is_batch_times(path: str | Path) -> bool:
    """Whether the CSV at ``path`` has every column of a batch-times table (:data:`BATCH_TIME_COLUMNS`)."""
    return set(BATCH_TIME_COLUMNS) <= set(_read_rows(Path(path)).columns)


def parse_columns(text: str | None) -> dict[str, str]:
    """``time_ms=median_ms,n_tokens=n`` as {our name: CSV column}; ConfigError on a bad item."""
    mapping: dict[str, str] = {}
    if not text or not text.strip():
        return mapping
    for item in text.split(","):
        pair = split_pair(item)
        if pair is None or not pair[1]:
            raise ConfigError("columns", item.strip(), "expected NAME=CSV_COLUMN")
        ours, theirs = pair
        if ours not in USER_COLUMNS:
            raise ConfigError("columns", ours, f"unknown name (known: {', '.join(USER_COLUMNS)})")
        mapping[ours] = theirs
    return mapping


def parse_filters(items: Sequence[str]) -> dict[str, str]:
    """``["model=llama3-8b", "mode=graph"]`` as {column: value}; ConfigError on a bad item."""
    filters: dict[str, str] = {}
    for item in items:
        pair = split_pair(item)
        if pair is None:
            raise ConfigError("where", item, "expected COLUMN=VALUE")
        filters[pair[0]] = pair[1]
    return filters


def read_csv(
    path: str | Path, columns: Mapping[str, str] | None = None, where: Mapping[str, str] | None = None,
    name: str | None = None,
) -> FitData:
    """A user's measurements, one sample per row (give medians).

    Needs ``time_ms`` and either ``n_tokens`` (token-only fits) or ``prefill_tokens`` and
    ``decode_tokens`` (composition fit as well). Optional: ``decode_kv_tokens`` (KV entries read by
    all decoders, default 0), ``chunks`` (prompt chunks, default 1 when there are prefill tokens)
    and ``logit_rows`` (default decoders + chunks). ``columns`` renames, ``where`` keeps the rows
    whose column equals the value.
    """
    path = Path(path)
    table = _read_rows(path)
    header = table.columns
    col = {key: (columns or {}).get(key, key) for key in USER_COLUMNS}
    for key in where or {}:
        if key not in header:
            raise ConfigError("where", key, f"{path.name} has no such column")
    table = table.where(where or {})
    if where and not len(table):
        raise ConfigError("where", dict(where), f"no rows of {path.name} match")
    table.require((col["time_ms"],))
    shaped = col["prefill_tokens"] in header and col["decode_tokens"] in header
    if not shaped and col["n_tokens"] not in header:
        raise ConfigError("n_tokens", path.name, "missing column (give n_tokens, or prefill_tokens and "
                          "decode_tokens; rename with columns)")
    if len(table) < MIN_ROWS:
        raise ConfigError("rows", len(table), f"{path.name}: a fit needs at least {MIN_ROWS} rows")
    n_tokens: list[int] = []
    times: list[float] = []
    shapes: list[BatchShape] = []
    for i in range(len(table)):
        t = table.number(i, col["time_ms"])
        if t <= 0:
            raise table.cell_error(i, col["time_ms"], "must be > 0")
        times.append(t)
        if shaped:
            shape = _user_shape(table, i, col)
            shapes.append(shape)
            n_tokens.append(shape.tokens)
        else:
            n_tokens.append(table.count(i, col["n_tokens"]))
        if n_tokens[-1] < 1:
            raise table.cell_error(i, col["n_tokens"] if not shaped else col["prefill_tokens"],
                                   "leaves a batch of 0 tokens (a batch needs at least 1)")
    filters = ", ".join(f"{k}={v}" for k, v in (where or {}).items())
    return FitData(name or path.stem, tuple(n_tokens), tuple(times), tuple(shapes) if shaped else None,
                   str(path), f"{filters + ': ' if filters else ''}{len(table)} rows")


def _user_shape(table: CsvTable, i: int, col: dict[str, str]) -> BatchShape:
    """The batch shape of the user's row ``i`` (defaults for the optional columns)."""
    pre = table.count(i, col["prefill_tokens"])
    dec = table.count(i, col["decode_tokens"])
    has = {key: col[key] in table.columns for key in ("decode_kv_tokens", "chunks", "logit_rows")}
    kv = table.count(i, col["decode_kv_tokens"]) if has["decode_kv_tokens"] else 0
    chunks = table.count(i, col["chunks"]) if has["chunks"] else int(pre > 0)
    if (pre > 0) != (chunks > 0) or chunks > pre:
        raise table.cell_error(i, col["chunks"], f"must be 1 to prefill_tokens ({pre}), or 0 without "
                               "prefill")
    logits = table.count(i, col["logit_rows"]) if has["logit_rows"] else dec + chunks
    return BatchShape(prefill_tokens=pre, decode_tokens=dec, chunk_tokens=_even_chunks(pre, chunks),
                      chunk_prefix_tokens=(0,) * chunks, decode_kv_tokens=kv, logit_rows=logits)


def load_data(
    data: str, data_dir: str | Path = "../shared/data", columns: Mapping[str, str] | None = None,
    where: Mapping[str, str] | None = None,
) -> list[FitData]:
    """The data sets named by ``data``: ``splitwise``, ``h200``, ``all`` (both) or a CSV path (a
    batch-times table, as ``llmqueue profile`` writes, without ``columns``: :func:`read_batch_times`;
    else :func:`read_csv`)."""
    key = data.strip().lower()
    if key in DATA_SETS or key == "all":
        names = list(DATA_SETS) if key == "all" else [key]
        readers = {"splitwise": read_splitwise, "h200": read_h200}
        base = Path(data_dir)
        if not base.is_dir():
            raise ConfigError("data-dir", str(data_dir), "not a directory (the project's ../shared/data)")
        return [d for n in names for d in readers[n](base / DATA_SETS[n])]
    path = Path(data)
    if not path.is_file():
        raise ConfigError("data", data, f"neither {', '.join([*DATA_SETS, 'all'])} nor a CSV file")
    if not columns and is_batch_times(path):
        return read_batch_times(path, where)
    return [read_csv(path, columns, where)]


# ---------------------------------------------------------------- fitting


def goodness(measured_ms: np.ndarray, predicted_ms: np.ndarray) -> tuple[float, float, float]:
    """(R^2, RMSE in ms, largest |predicted - measured| / measured) of a fit."""
    t = np.asarray(measured_ms, dtype=float)
    predicted = np.asarray(predicted_ms, dtype=float)
    resid = predicted - t
    rmse = math.sqrt(float(np.sum(resid**2)) / t.size)
    return _r_squared(t, predicted), rmse, float(np.max(np.abs(resid) / t))


def _identifiable(x: np.ndarray) -> list[int]:
    """Columns kept in order, skipping each that adds no rank (collinear terms get 0)."""
    scaled = x / np.maximum(np.abs(x).max(axis=0), 1e-300)
    keep: list[int] = []
    for j in range(x.shape[1]):
        if np.linalg.matrix_rank(scaled[:, [*keep, j]]) > len(keep):
            keep.append(j)
    return keep


def fit_composition(
    shapes: Sequence[BatchShape], time_ms: Sequence[float] | np.ndarray, floor: bool = True
) -> CompositionTime:
    """Least-squares :class:`CompositionTime`, every coefficient >= 0 (scipy ``nnls``).

    A term collinear with earlier ones (in :data:`COMPOSITION_TERMS` order) is fixed at 0. With
    ``floor``, the floor is scanned over 0 and the measured times: for each candidate the linear
    part is fitted to the samples above it, and the smallest floor whose whole-data squared
    error is within 1e-12 (relative to the data's total sum of squares) of the best wins: a flat
    small-batch regime, as below the piecewise knee.
    """
    return _fit_composition(shapes, time_ms, floor)[0]


def _fit_composition(
    shapes: Sequence[BatchShape], time_ms: Sequence[float] | np.ndarray, floor: bool
) -> tuple[CompositionTime, list[int]]:
    """:func:`fit_composition` and the columns it fitted (the others are collinear, fixed at 0)."""
    from scipy.optimize import nnls
    t = np.asarray(time_ms, dtype=float)
    x = _features(shapes)
    if x.shape[0] != t.size or t.size < MIN_ROWS:
        raise ConfigError("rows", (x.shape[0], t.size), f"fit needs >= {MIN_ROWS} shapes and as many times")
    if not (np.all(np.isfinite(t)) and t.min() > 0):
        raise ConfigError("time_ms", float(t.min()), "times must be finite and > 0")
    keep = _identifiable(x)
    scale = np.abs(x[:, keep]).max(axis=0)
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    candidates: list[tuple[float, float, np.ndarray]] = []
    for level in [0.0, *(sorted(set(t.tolist())) if floor else [])]:
        above = t > level
        if int(above.sum()) < len(keep):
            break
        coef = np.zeros(x.shape[1])
        coef[keep] = nnls(x[above][:, keep] / scale, t[above])[0] / scale
        if max(coef[0], level) < 1e-9:
            continue  # no intercept and no floor: not a valid model
        sse = float(np.sum((np.maximum(level, x @ coef) - t) ** 2))
        candidates.append((level, sse, coef))
    if not candidates:
        raise ConfigError("time_ms", t.size, "no composition fit with a positive intercept or floor")
    best = min(sse for _, sse, _ in candidates)
    level, _, coef = next(c for c in candidates if c[1] <= best + 1e-12 * max(ss_tot, 1e-300))
    return CompositionTime(*(float(v) for v in coef), floor=float(level)), keep


def _best_staircase(n: np.ndarray, t: np.ndarray) -> StaircaseTime:
    """Staircase with the power-of-two block b0 (1 .. max n) of least squared error."""
    top = int(n.max())
    fits = [fit_staircase(n, t, 2**k) for k in range(top.bit_length())]
    return max(fits, key=lambda f: f[1])[0]


@dataclass(frozen=True)
class ModelFit:
    """One fitted model of one data set and its goodness of fit."""

    kind: str
    model: BatchTime | CompositionTime
    predicted_ms: tuple[float, ...]
    r_squared: float
    rmse_ms: float
    max_rel_error: float
    parameters: int
    method: str

    @property
    def adjusted_r_squared(self) -> float | None:
        """R^2 charged for the fitted parameters, 1 - (1 - R^2)(m - 1)/(m - p - 1); None when
        there are not more samples ``m`` than ``parameters + 1``."""
        m = len(self.predicted_ms)
        if m - self.parameters - 1 <= 0:
            return None
        return 1.0 - (1.0 - self.r_squared) * (m - 1) / (m - self.parameters - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (spec, not the predictions)."""
        return {"kind": self.kind, "spec": self.model.spec, "r_squared": self.r_squared,
                "adjusted_r_squared": self.adjusted_r_squared, "rmse_ms": self.rmse_ms,
                "max_rel_error": self.max_rel_error, "parameters": self.parameters, "method": self.method}


@dataclass(frozen=True)
class DataFit:
    """Every candidate fitted to one data set: token-only ones, then the composition model."""

    data: FitData
    fits: tuple[ModelFit, ...]

    @property
    def best_tokens(self) -> ModelFit:
        """The token-only fit of highest R^2 (ties: piecewise, staircase, linear)."""
        return max((f for f in self.fits if f.kind in TOKEN_KINDS), key=lambda f: f.r_squared)

    @property
    def composition(self) -> ModelFit | None:
        """The composition fit, None for token-count-only data."""
        return next((f for f in self.fits if f.kind == "composition"), None)

    @property
    def better(self) -> ModelFit:
        """Composition or the best token-only fit, whichever has the higher adjusted R^2 (plain
        R^2 when a fit has too few samples for it): more terms must earn their keep."""
        comp, tokens = self.composition, self.best_tokens
        if comp is None:
            return tokens
        a, b = comp.adjusted_r_squared, tokens.adjusted_r_squared
        if a is None or b is None:
            a, b = comp.r_squared, tokens.r_squared
        return comp if a > b else tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary of the data set and its fits."""
        return {"name": self.data.name, "source": self.data.source, "rows": self.data.rows,
                "samples": len(self.data.time_ms), "fits": [f.to_dict() for f in self.fits],
                "best_tokens": self.best_tokens.kind, "better": self.better.kind}


def _scored(kind: str, model: Any, predicted: np.ndarray, t: np.ndarray, parameters: int,
            method: str) -> ModelFit:
    r2, rmse, rel = goodness(t, predicted)
    return ModelFit(kind, model, tuple(float(v) for v in predicted), r2, rmse, rel, parameters, method)


def fit_data(data: FitData) -> DataFit:
    """Fit the token-only candidates and, with batch shapes, the composition model to ``data``."""
    n = np.asarray(data.n_tokens, dtype=float)
    t = np.asarray(data.time_ms, dtype=float)
    if t.size < MIN_ROWS:
        raise ConfigError("rows", t.size, f"{data.name}: a fit needs at least {MIN_ROWS} samples")
    piecewise = fit_piecewise(n, t)[0]
    staircase = _best_staircase(n, t)
    linear = LinearTime(*_nnls_line(n, t))  # least squares c + a*n, c, a >= 0
    fits = [
        _scored("piecewise", piecewise, piecewise.times_ms(n), t, 3, "least squares c, a >= 0; b0 scanned"),
        _scored("staircase", staircase, staircase.times_ms(n), t, 3,
                "least squares c, a >= 0; b0 scanned over powers of two"),
        _scored("linear", linear, linear.times_ms(n), t, 2, "least squares c, a >= 0"),
    ]
    if data.shapes is not None:
        comp, keep = _fit_composition(data.shapes, t, True)
        dropped = [k for j, k in enumerate(COMPOSITION_TERMS) if j not in keep]
        method = "nnls on " + ", ".join(k for k in COMPOSITION_TERMS if k not in dropped)
        method += (f" ({', '.join(dropped)} collinear: 0)" if dropped else "") + "; floor scanned"
        predicted = np.array([comp.shape_time_ms(s) for s in data.shapes])
        fits.append(_scored("composition", comp, predicted, t, len(keep) + 1, method))
    return DataFit(data, tuple(fits))


def presets_from(result: DataFit) -> list[Preset]:
    """The presets of one fitted data set: ``NAME`` (composition, when fitted) and ``NAME-tokens``
    (best token-only fit), with provenance; the shipped table is this on the shipped data."""
    better = result.better
    chosen = [(result.data.name, result.composition), (f"{result.data.name}-tokens", result.best_tokens)]
    return [
        Preset(name=name, kind=fit.kind, spec=fit.model.spec, data=result.data.source, rows=result.data.rows,
               method=fit.method, samples=len(fit.predicted_ms), r_squared=fit.r_squared,
               rmse_ms=fit.rmse_ms, max_rel_error=fit.max_rel_error, better=fit is better, fitted=FIT_DATE)
        for name, fit in chosen
        if fit is not None
    ]


# ---------------------------------------------------------------- plots


def plot_fit(result: DataFit, path: str | Path) -> Path:
    """PNG of predicted vs measured and of the relative residuals per batch size (best token-only
    fit and the composition fit), for judging a fit by eye."""
    from llmqueue.io.plotting import pyplot, save

    plt = pyplot()
    t = np.asarray(result.data.time_ms)
    n = np.asarray(result.data.n_tokens)
    shown = [f for f in (result.best_tokens, result.composition) if f is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for fit, marker in zip(shown, ("o", "x"), strict=False):
        pred = np.asarray(fit.predicted_ms)
        label = f"{fit.kind} (R^2 {fit.r_squared:.4f})"
        left.scatter(t, pred, marker=marker, s=22, label=label)
        right.scatter(n, 100 * (pred - t) / t, marker=marker, s=22, label=label)
    lo, hi = float(t.min()) * 0.8, float(t.max()) * 1.25
    left.plot([lo, hi], [lo, hi], color="grey", lw=1)
    left.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)",
             title=f"{result.data.name}: predicted vs measured")
    right.axhline(0, color="grey", lw=1)
    right.set(xscale="log", xlabel="tokens in the batch", ylabel="residual (% of measured)",
              title=f"{result.data.name}: residuals")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)

"""Iteration time from a kernel-level GPU profile: per-layer kernel times, summed over the model.

The profile is the format of LLMServingSim's vLLM profiler: a folder with ``dense.csv``
(``layer,tokens,time_us``: the token-parallel kernels), ``attention.csv``
(``prefill_chunk,kv_prefill,n_decode,kv_decode,time_us``: one attention kernel call for a prompt
chunk of ``prefill_chunk`` tokens after ``kv_prefill`` cached ones plus ``n_decode`` decoders
that each read ``kv_decode`` cached tokens), ``per_sequence.csv`` (``layer,sequences,time_us``:
LM head and sampler) and a ``profile_meta.yaml`` beside it or one folder up.

One iteration of a batch of ``T`` tokens (the profiler's Llama block sequence)::

    embedding(T) + layers * [2 layernorm(T) + qkv_proj(T) + rotary_emb(T) + attention(batch)
                             + o_proj(T) + gate_up_proj(T) + act_fn(T) + down_proj(T)]
    + final_layernorm(T) + lm_head(R) + sampler(R)

with ``R`` rows through the LM head: vLLM's V1 model runner takes the logits at the last scheduled
token of every request in the batch (decoders and every prompt chunk; the samples of unfinished
prompts are thrown away). Each kernel time is multiplied by the ratio of its work at the target's
per-GPU shapes to its work at the profiled shapes (:func:`scale_factors`); for a profile taken
at the deployment's own shard shapes every factor is 1.

Interpolation is linear in each axis between grid points (GEMM and attention times are close to
affine in tokens, sequences and KV length between tile steps). Below the first grid point a time
is held at the first value; above the last, dense and per-sequence kernels grow in proportion to
their size (compute-bound) and attention continues its last segment. With ``monotone`` (the
default) every table is first replaced by its monotone envelope (the largest time measured at a
point it dominates in every axis): a kernel is never faster with more work, and the profile's
dips are measurement noise (3 timed runs per point).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import read_table, split_items
from llmqueue.io.tables import CsvTable, read_csv_table
from llmqueue.model.batchtime import BatchShape
from llmqueue.model.memory import ModelShape

__all__ = [
    "KNOWN_MODELS",
    "LAYER_KERNELS",
    "LLAMA31_8B",
    "MODEL_KERNELS",
    "SEQUENCE_KERNELS",
    "AttentionTable",
    "Curve",
    "ModelDims",
    "ProfileTime",
    "kernel_work",
    "parse_profile_spec",
    "scale_factors",
]

_FIELD = "profile"
LAYER_KERNELS: Mapping[str, int] = {
    "layernorm": 2, "qkv_proj": 1, "rotary_emb": 1, "o_proj": 1, "gate_up_proj": 1, "act_fn": 1,
    "down_proj": 1,
}
"""Token-parallel kernels of one decoder layer and how often each runs (input and post-attention
RMSNorm are the same kernel)."""
MODEL_KERNELS: Mapping[str, int] = {"embedding": 1, "final_layernorm": 1}
"""Token-parallel kernels that run once per iteration, outside the layers."""
SEQUENCE_KERNELS: tuple[str, ...] = ("lm_head", "sampler")
"""Kernels that run once per logit row."""
SHARD_FIELDS = ("heads", "kv_heads", "intermediate", "vocab")
"""Shapes divided by the tensor-parallel degree on each GPU (the profiler shards these four)."""


# ---------------------------------------------------------------- model shapes


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The shapes that set each kernel's work: a decoder-only transformer (Llama layout)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params_billion: float
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab",
                    "dtype_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_FIELD}.{key}", value, "must be an integer >= 1")
        if not (isinstance(self.params_billion, int | float) and self.params_billion > 0):
            raise ConfigError(f"{_FIELD}.params_billion", self.params_billion, "must be > 0")

    def shard(self, tp: int) -> ModelDims:
        """Per-GPU shapes under tensor parallelism ``tp``: heads, KV heads, MLP width and vocab
        divided by ``tp`` (the weights split the same way)."""
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"{_FIELD}.tp", tp, "must be an integer >= 1")
        bad = [f for f in SHARD_FIELDS if getattr(self, f) % tp]
        if bad:
            raise ConfigError(f"{_FIELD}.tp", tp, f"{bad[0]}={getattr(self, bad[0])} is not divisible")
        if tp == 1:
            return self
        return ModelDims(
            f"{self.name}/tp{tp}", self.layers, self.hidden, self.intermediate // tp,
            self.heads // tp, self.kv_heads // tp, self.head_dim, self.vocab // tp,
            self.params_billion / tp, self.dtype_bytes,
        )

    def kv_shape(self) -> ModelShape:
        """What :class:`~llmqueue.model.memory.KVCache` needs to size the cache (whole model)."""
        return ModelShape(self.layers, self.kv_heads, self.head_dim, self.dtype_bytes,
                          self.params_billion)


LLAMA31_8B = ModelDims(
    name="meta-llama/Llama-3.1-8B", layers=32, hidden=4096, intermediate=14336, heads=32,
    kv_heads=8, head_dim=128, vocab=128256, params_billion=8.03,
)
"""Llama-3.1-8B (its HF config.json; 8.03 B parameters, bf16)."""
KNOWN_MODELS: Mapping[str, ModelDims] = {LLAMA31_8B.name: LLAMA31_8B}


def kernel_work(dims: ModelDims) -> dict[str, float]:
    """Per token (per row for the LM head and sampler), what each kernel's time is proportional
    to once the GPU is busy: weight elements of a GEMM, vector width of an element-wise kernel,
    query width of attention (KV bytes move with it at a fixed GQA ratio)."""
    q, kv, h = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim, dims.hidden
    return {
        "embedding": h, "layernorm": h, "final_layernorm": h,
        "qkv_proj": h * (q + 2 * kv), "rotary_emb": q + kv, "o_proj": q * h,
        "gate_up_proj": h * 2 * dims.intermediate, "act_fn": dims.intermediate,
        "down_proj": dims.intermediate * h, "attention": q,
        "lm_head": dims.vocab * h, "sampler": dims.vocab,
    }


def scale_factors(profiled: ModelDims, target: ModelDims) -> dict[str, float]:
    """Factor per kernel that turns a time measured at ``profiled`` shapes into one at ``target``
    shapes: the ratio of their work (:func:`kernel_work`).

    Exact for a kernel that is bandwidth- or compute-bound at both shapes; for latency-bound
    calls (a few tokens) it overstates the change. Equal shapes give 1 everywhere.
    """
    w_p, w_t = kernel_work(profiled), kernel_work(target)
    return {k: w_t[k] / w_p[k] for k in w_p}


# ---------------------------------------------------------------- one-axis tables


@dataclass(frozen=True, slots=True)
class Curve:
    """A kernel's time (us) over one size axis (tokens or rows): linear between grid points,
    the first value below the first point, in proportion to the size beyond the last."""

    sizes: tuple[int, ...]
    times_us: tuple[float, ...]
    _x: np.ndarray = field(init=False, repr=False, compare=False)
    _y: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.times_us) or not self.sizes:
            raise ConfigError(_FIELD, len(self.sizes), "a curve needs as many times as sizes (>= 1)")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:], strict=False)) or self.sizes[0] < 1:
            raise ConfigError(_FIELD, self.sizes[:3], "curve sizes must be increasing integers >= 1")
        if min(self.times_us) <= 0 or not all(math.isfinite(t) for t in self.times_us):
            raise ConfigError(_FIELD, min(self.times_us), "kernel times must be finite and > 0")
        object.__setattr__(self, "_x", np.asarray(self.sizes, dtype=float))
        object.__setattr__(self, "_y", np.asarray(self.times_us, dtype=float))

    def __call__(self, size: float) -> float:
        """Time in us at ``size`` (0 for size <= 0: the kernel does not run)."""
        if size <= 0:
            return 0.0
        last = self.sizes[-1]
        if size > last:
            return self.times_us[-1] * size / last
        return float(np.interp(size, self._x, self._y))

    def times(self, sizes: np.ndarray) -> np.ndarray:
        """Vectorised ``__call__``."""
        s = np.asarray(sizes, dtype=float)
        inside = np.interp(s, self._x, self._y)
        out = np.where(s > self.sizes[-1], self.times_us[-1] * s / self.sizes[-1], inside)
        return np.where(s <= 0, 0.0, out)

    def monotone(self) -> Curve:
        """This curve through its running maximum (its monotone envelope)."""
        return Curve(self.sizes, tuple(float(v) for v in np.maximum.accumulate(self._y)))


# ---------------------------------------------------------------- attention


def _fill_line(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """A 1-D line with its missing (NaN) cells filled: linear between known cells, the first known
    value below them, the last known segment continued above them (never decreasing)."""
    known = ~np.isnan(ys)
    kx, ky = xs[known], ys[known]
    out = np.interp(xs, kx, ky)
    if len(kx) > 1:
        slope = max(0.0, (ky[-1] - ky[-2]) / (kx[-1] - kx[-2]))
        above = xs > kx[-1]
        out[above] = ky[-1] + slope * (xs[above] - kx[-1])
    return np.where(known, ys, out)


class _Grid:
    """A table on the tensor grid of every value measured on each axis, multilinear between grid
    points. Cells the profile did not measure are filled axis by axis, last axis first, from the
    measured cells of the same line (so a measured cell keeps its time exactly)."""

    __slots__ = ("axes", "values")

    def __init__(self, coords: np.ndarray, times: np.ndarray, monotone: bool) -> None:
        axes, ranks = [], []
        for axis in range(coords.shape[1]):
            values, inverse = np.unique(coords[:, axis], return_inverse=True)
            axes.append(values)
            ranks.append(inverse)
        grid = np.full(tuple(len(a) for a in axes), np.nan)
        grid[tuple(ranks)] = times
        for axis in reversed(range(grid.ndim)):
            moved = np.moveaxis(grid, axis, -1)
            lines = moved.reshape(-1, moved.shape[-1])
            for j in range(lines.shape[0]):
                line = lines[j]
                if np.isnan(line).any() and not np.isnan(line).all():
                    lines[j] = _fill_line(axes[axis], line)
            grid = np.moveaxis(lines.reshape(moved.shape), -1, axis)
        if monotone:  # the monotone envelope: the largest time at any cell this one dominates
            for axis in range(grid.ndim):
                grid = np.maximum.accumulate(grid, axis=axis)
        self.axes = [a.tolist() for a in axes]
        self.values = np.ascontiguousarray(grid)

    def at(self, point: Sequence[float]) -> float:
        """The table at ``point``: exact at grid points, multilinear between them, the first cell
        below the grid, the last segment continued above it."""
        corners: list[tuple[tuple[int, float], ...]] = []
        for x, xs in zip(point, self.axes, strict=True):
            n = len(xs)
            if n == 1 or x <= xs[0]:
                corners.append(((0, 1.0),))
                continue
            i = bisect_right(xs, x)
            if i == n:
                if x == xs[-1]:
                    corners.append(((n - 1, 1.0),))
                    continue
                i = n - 1
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            corners.append(((i - 1, 1.0 - w), (i, w)))
        total = 0.0
        for combo in product(*corners):
            weight = 1.0
            for _, w in combo:
                weight *= w
            if weight:
                total += weight * float(self.values[tuple(k for k, _ in combo)])
        return total


@dataclass(frozen=True, slots=True, eq=False)
class AttentionTable:
    """The attention kernel of one layer: measured for one prompt chunk plus ``n`` decoders that
    all read the same KV length, extended to any batch (see :meth:`time_us`)."""

    rows: np.ndarray  # columns prefill_chunk, kv_prefill, n_decode, kv_decode, time_us
    monotone: bool = True
    _prefill: _Grid = field(init=False, repr=False)
    _decode: _Grid = field(init=False, repr=False)
    _mixed: _Grid | None = field(init=False, repr=False)
    floor_us: float = field(init=False)

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, dtype=float)
        if rows.ndim != 2 or rows.shape[1] != 5:
            raise ConfigError(_FIELD, rows.shape, "attention rows need 5 columns")
        if not np.all(np.isfinite(rows)) or rows[:, :4].min() < 0 or rows[:, 4].min() <= 0:
            raise ConfigError(_FIELD, "attention.csv", "sizes must be >= 0 and times > 0")
        pre = rows[(rows[:, 0] > 0) & (rows[:, 2] == 0)]
        dec = rows[(rows[:, 0] == 0) & (rows[:, 2] > 0)]
        mix = rows[(rows[:, 0] > 0) & (rows[:, 2] > 0)]
        if not len(pre) or not len(dec):
            raise ConfigError(_FIELD, "attention.csv",
                              "needs pure-prefill rows (n_decode 0) and pure-decode rows (prefill_chunk 0)")
        tables = [
            _Grid(part[:, cols], part[:, 4], self.monotone) if len(part) else None
            for part, cols in ((pre, [0, 1]), (dec, [2, 3]), (mix, [0, 1, 2, 3]))
        ]
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "_prefill", tables[0])
        object.__setattr__(self, "_decode", tables[1])
        object.__setattr__(self, "_mixed", tables[2])
        object.__setattr__(self, "floor_us", float(pre[:, 4].min()))

    def lookup_us(self, prefill_chunk: float, kv_prefill: float, n_decode: float,
                  kv_decode: float) -> float:
        """The table at one point (exact at grid points; interpolated between them)."""
        if n_decode <= 0:
            if prefill_chunk <= 0:
                return 0.0
            return self._prefill.at((prefill_chunk, kv_prefill))
        if prefill_chunk <= 0:
            return self._decode.at((n_decode, kv_decode))
        if self._mixed is None:  # no mixed measurements: the two calls back to back
            return self._prefill.at((prefill_chunk, kv_prefill)) + self._decode.at((n_decode, kv_decode))
        return self._mixed.at((prefill_chunk, kv_prefill, n_decode, kv_decode))

    def time_us(self, chunks: Sequence[int], prefixes: Sequence[int], n_decode: int,
                decode_kv_tokens: int) -> float:
        """One layer's attention for a whole batch.

        Decoders enter at their mean cached length (``decode_kv_tokens`` counts each decoder's
        new token, the profile's ``kv_decode`` does not). The prompt chunk with the most attention
        work joins them in one table lookup; every further chunk adds its own pure-prefill time
        above the kernel's floor (the fastest measured call), as extra work in the same call.
        """
        kv = max(decode_kv_tokens / n_decode - 1.0, 0.0) if n_decode else 0.0
        if not chunks:
            return self.lookup_us(0, 0, n_decode, kv)
        order = sorted(range(len(chunks)), key=lambda i: chunks[i] * (prefixes[i] + (chunks[i] + 1) / 2),
                       reverse=True)
        first = order[0]
        total = self.lookup_us(chunks[first], prefixes[first], n_decode, kv)
        for i in order[1:]:
            total += max(self.lookup_us(chunks[i], prefixes[i], 0, 0) - self.floor_us, 0.0)
        return total


# ---------------------------------------------------------------- the model


def _read_csv(path: Path, columns: tuple[str, ...]) -> CsvTable:
    """A profile CSV with the expected header (the shared table reader; errors name the file)."""
    table = read_csv_table(path, _FIELD, "profile file")
    table.require(columns)
    return table


def _number(table: CsvTable, i: int, column: str) -> float:
    """Row ``i``'s cell in ``column``: a finite number >= 0 (error naming file, line and column)."""
    value = table.number(i, column)
    if value < 0:
        raise table.cell_error(i, column, "must be >= 0")
    return value


def _curves(path: Path, size_col: str) -> dict[str, Curve]:
    """Per kernel, its curve over ``size_col`` (repeated sizes: their median)."""
    points: dict[str, dict[int, list[float]]] = {}
    table = _read_csv(path, ("layer", size_col, "time_us"))
    for i, row in enumerate(table.rows):
        size = table.count(i, size_col, 1)
        time = _number(table, i, "time_us")
        if time <= 0:
            raise table.cell_error(i, "time_us", "must be > 0")
        points.setdefault(row["layer"], {}).setdefault(size, []).append(time)
    return {
        name: Curve(tuple(sorted(by)), tuple(float(np.median(by[s])) for s in sorted(by)))
        for name, by in points.items()
    }


def _attention_rows(path: Path) -> np.ndarray:
    cols = ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us")
    table = _read_csv(path, cols)
    rows = [[_number(table, i, c) for c in cols] for i in range(len(table))]
    if not rows:
        raise ConfigError(_FIELD, str(path), "no rows")
    return np.asarray(rows, dtype=float)


def _find_meta(folder: Path) -> Path | None:
    for candidate in (folder / "profile_meta.yaml", folder / "meta.yaml",
                      folder.parent / "profile_meta.yaml", folder.parent / "meta.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _folder_tp(folder: Path, meta: Mapping[str, Any]) -> int:
    """The tensor-parallel degree a profile folder was taken for: ``tp<N>`` in its name, else the
    engine's ``tensor_parallel_size``, else 1."""
    name = folder.name
    for part in (name.rsplit("_", 1)[-1], name):
        if part.startswith("tp") and part[2:].isdigit():
            return int(part[2:])
    engine = meta.get("engine_effective") or {}
    return int(engine.get("tensor_parallel_size", 1) or 1)


_OVERRIDE_KEYS = {"intermediate_size": "intermediate", "num_attention_heads": "heads",
                  "num_key_value_heads": "kv_heads", "vocab_size": "vocab", "hidden_size": "hidden"}


def _overrides_tp(model: ModelDims, overrides: Mapping[str, Any], degrees: Sequence[int]) -> int | None:
    """Which tensor-parallel shard of ``model`` the profiler's recorded ``hf_overrides`` describe
    (None when they match no listed degree)."""
    for tp in sorted({1, *degrees}):
        try:
            shard = model.shard(tp)
        except ConfigError:
            continue
        if all(getattr(shard, attr) == overrides[key]
               for key, attr in _OVERRIDE_KEYS.items() if key in overrides):
            return tp
    return None


@dataclass(frozen=True, slots=True, eq=False)
class ProfileTime:
    """A :class:`~llmqueue.model.batchtime.ShapeTime` from a kernel-level profile (module docstring):
    ``layers`` decoder layers of profiled per-layer kernels, plus the once-per-iteration kernels,
    each kernel's time times its ``scales`` factor, plus ``overhead_us`` per iteration."""

    dense: Mapping[str, Curve]
    per_sequence: Mapping[str, Curve]
    attention: AttentionTable
    layers: int
    scales: Mapping[str, float] = field(default_factory=dict)
    overhead_us: float = 0.0
    source: str = ""
    notes: tuple[str, ...] = ()
    _layer_us: np.ndarray = field(init=False, repr=False)
    _model_us: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ConfigError(f"{_FIELD}.layers", self.layers, "must be an integer >= 1")
        if not (math.isfinite(self.overhead_us) and self.overhead_us >= 0):
            raise ConfigError(f"{_FIELD}.overhead_us", self.overhead_us, "must be >= 0")
        needed = [*LAYER_KERNELS, *MODEL_KERNELS]
        missing = [k for k in needed if k not in self.dense]
        missing += [k for k in SEQUENCE_KERNELS if k not in self.per_sequence]
        if missing:
            raise ConfigError(_FIELD, self.source or "profile", f"no times for kernel '{missing[0]}'")
        # dense per-token sums for every batch size up to the largest profiled one
        top = max(c.sizes[-1] for c in self.dense.values())
        n = np.arange(top + 1)
        object.__setattr__(self, "_layer_us", self._dense_sum(LAYER_KERNELS, n))
        object.__setattr__(self, "_model_us", self._dense_sum(MODEL_KERNELS, n))

    def _dense_sum(self, kernels: Mapping[str, int], n: np.ndarray) -> np.ndarray:
        return sum(
            (count * self.scales.get(k, 1.0) * self.dense[k].times(n) for k, count in kernels.items()),
            np.zeros(n.shape),
        )

    @classmethod
    def from_dir(cls, path: str | Path, *, layers: int | None = None, model: ModelDims | None = None,
                 target: ModelDims | None = None, monotone: bool = True,
                 overhead_us: float = 0.0) -> ProfileTime:
        """Read a profile folder. ``model`` (default: the meta's model, if known) gives the layer
        count and, sharded to the folder's TP degree, the shapes the kernels ran at; ``target``
        (default: the same) the per-GPU shapes to time. ``layers`` overrides the layer count."""
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(_FIELD, str(path), "profile folder not found")
        meta_path = _find_meta(folder)
        meta: Mapping[str, Any] = {}
        if meta_path is not None:
            loaded = read_table(meta_path, _FIELD)
            meta = loaded if isinstance(loaded, dict) else {}
        notes: list[str] = []
        name = str(meta.get("model", ""))
        if model is None:
            model = KNOWN_MODELS.get(name)
        tp = _folder_tp(folder, meta)
        scales: dict[str, float] = {}
        if model is not None:
            profiled = model.shard(tp)
            if target is not None:
                scales = scale_factors(profiled, target)
            engine = meta.get("engine_effective") or {}
            overrides = engine.get("hf_overrides") or {}
            degrees = [int(d) for d in meta.get("tp_degrees", []) or []]
            match = _overrides_tp(model, overrides, degrees)
            if overrides and match is not None and match != tp:
                notes.append(
                    f"{meta_path.name if meta_path else 'meta'} records hf_overrides of the TP-{match} "
                    f"shard (the last engine the profiler booted); this folder is TP-{tp}, taken at "
                    f"the {profiled.name} shapes"
                )
            elif overrides and match is None:
                notes.append("the meta's hf_overrides match no tensor-parallel shard of "
                             f"{model.name}: kernel shapes assumed to be the TP-{tp} shard")
        dense = _curves(folder / "dense.csv", "tokens")
        per_sequence = _curves(folder / "per_sequence.csv", "sequences")
        rows = _attention_rows(folder / "attention.csv")
        if layers is None:
            if model is None:
                raise ConfigError(f"{_FIELD}.layers", None,
                                  f"model {name or '?'} is not known: give the number of layers")
            layers = model.layers
        if monotone:
            dense = {k: c.monotone() for k, c in dense.items()}
            per_sequence = {k: c.monotone() for k, c in per_sequence.items()}
        attention = AttentionTable(rows, monotone=monotone)
        source = str(path) + ("" if monotone else ",monotone=0") + (
            f",overhead_us={overhead_us:g}" if overhead_us else "")
        if model is None or layers != model.layers:
            source += f",layers={layers}"
        return cls(dense, per_sequence, attention, layers, scales, float(overhead_us), source,
                   tuple(notes))

    def breakdown_us(self, shape: BatchShape) -> dict[str, float]:
        """One iteration's time in us by part: layers' dense kernels, attention (all layers),
        embedding and final norm, LM head and sampler, overhead."""
        tokens = shape.tokens
        if tokens < len(self._layer_us):
            layer_us, model_us = float(self._layer_us[tokens]), float(self._model_us[tokens])
        else:
            arr = np.array([tokens])
            layer_us = float(self._dense_sum(LAYER_KERNELS, arr)[0])
            model_us = float(self._dense_sum(MODEL_KERNELS, arr)[0])
        attention = self.attention.time_us(shape.chunk_tokens, shape.chunk_prefix_tokens,
                                           shape.decode_tokens, shape.decode_kv_tokens)
        rows = shape.decode_tokens + len(shape.chunk_tokens)
        scale = self.scales.get
        return {
            "dense_us": self.layers * layer_us,
            "attention_us": self.layers * scale("attention", 1.0) * attention,
            "model_us": model_us,
            "lm_head_us": scale("lm_head", 1.0) * self.per_sequence["lm_head"](rows),
            "sampler_us": scale("sampler", 1.0) * self.per_sequence["sampler"](rows),
            "overhead_us": self.overhead_us,
        }

    def shape_time_ms(self, shape: BatchShape) -> float:
        """Time in ms of one iteration of this batch shape."""
        return sum(self.breakdown_us(shape).values()) / 1000.0

    @property
    def spec(self) -> str:
        """``profile:PATH[,...]``, read back by :func:`parse_profile_spec` (a model scaled to
        another ``target`` shape does not round-trip: the spec does not name the target)."""
        return f"profile:{self.source}"


def parse_profile_spec(spec: str) -> ProfileTime:
    """``profile:DIR[,layers=N][,monotone=0|1][,overhead_us=X]``: a :class:`ProfileTime`."""
    kind, colon, body = spec.partition(":")
    if kind.strip().lower() != "profile" or not colon or not body.strip():
        raise ConfigError("batch-time", spec, "expected profile:DIR[,layers=N,monotone=0,overhead_us=X]")
    path, _, rest = body.partition(",")
    opts = split_items(spec, rest, "batch-time", keys=("layers", "monotone", "overhead_us"))[1]
    try:
        layers = int(opts["layers"]) if "layers" in opts else None
        overhead = float(opts.get("overhead_us", "0"))
    except ValueError:
        raise ConfigError("batch-time", spec, "layers must be an integer, overhead_us a number") from None
    monotone = opts.get("monotone", "1")
    if monotone not in ("0", "1"):
        raise ConfigError("batch-time", spec, "monotone must be 0 or 1")
    return ProfileTime.from_dir(path.strip(), layers=layers, monotone=monotone == "1", overhead_us=overhead)

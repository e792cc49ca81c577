"""Batch times measured from a model's shapes: real decoder iterations timed in PyTorch.

``llmqueue profile`` builds a model's decoder layers (:mod:`llmqueue.model.hfconfig` shapes) with
random weights on the local device and times one engine iteration per batch composition of a
grid (:class:`Point`: one prompt chunk after a cached prefix, plus decoders sharing one context
length). One iteration is what a serving engine runs: the embedding lookup; per layer RMSNorm,
fused QKV projection, rotary embedding, attention of the chunk (causal, lower-right aligned, over
its prefix plus itself) and of each decoder (over its whole context) with torch's
``scaled_dot_product_attention`` on a KV cache of random contents (each layer its own region, the
new K/V written in place), output projection, residual, RMSNorm, SwiGLU MLP (a mixture of experts:
router, top-k, batched expert products), residual; then the final norm and the LM head for the
last token of each request only. Tensor parallelism is approximated by one GPU's shard shapes
(:meth:`~llmqueue.model.hfconfig.DecoderShape.sharded`): the all-reduces are not timed.

Timing (:data:`TIMING`): on CUDA, ``graph`` captures each point once as a CUDA graph after an
eager warm-up, replays it ``warmup`` times, then times ``repeats`` replays between CUDA events
(device time, no Python launch cost); ``eager`` times eager forwards the same way. On CPU only
``eager`` exists (wall clock of whole forwards, Python dispatch included).

The table is written in the format of ``../shared/data/gpu/batch_times_h200.csv`` (its 14
columns, then ``device``, ``dtype``, ``tp``, ``layers_timed`` and ``timing``), which
``--batch-time table:PATH`` and ``llmqueue fit`` read (:func:`llmqueue.studies.fit.read_batch_times`).
:func:`compare_tables` compares two such tables per composition (the H200 validation).

torch is optional (``pip install 'llmqueue[profile]'``) and imported only when a profile runs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmqueue.errors import ConfigError
from llmqueue.io.fileio import atomic_write_text
from llmqueue.io.tables import read_csv_table
from llmqueue.model.hfconfig import DecoderShape

__all__ = [
    "COMPOSITIONS",
    "CPU_GRID",
    "CSV_COLUMNS",
    "CUDA_GRID",
    "DTYPES",
    "H200_COLUMNS",
    "INSTALL_HINT",
    "MODES",
    "CompositionError",
    "GridSpec",
    "Point",
    "ProfileRow",
    "ProfileRun",
    "ProfileSettings",
    "check_grid",
    "compare_tables",
    "make_grid",
    "memory_bytes",
    "read_grid",
    "resolve_device",
    "rows_csv",
    "run_profile",
    "torch_or_error",
    "write_rows",
]

INSTALL_HINT = "pip install 'llmqueue[profile]'"
"""How to get torch for a profile (the optional extra pins the tested release)."""

COMPOSITIONS = ("prefill", "decode", "mixed50", "mixed90", "decode_L4096")
"""The built-in compositions, as in the H200 measurement (``../shared/data/gpu/README.md``)."""

H200_COLUMNS = (
    "model",
    "gpu_name",
    "torch_version",
    "n_tokens",
    "n_prefill_tokens",
    "n_decode_tokens",
    "n_requests",
    "decode_context",
    "prefill_context",
    "median_ms",
    "min_ms",
    "max_ms",
    "composition",
    "mode",
)
CSV_COLUMNS = (*H200_COLUMNS, "device", "dtype", "tp", "layers_timed", "timing")
"""The profile table's columns: the H200 table's, then what the measurement ran on and how."""

DTYPES = ("bf16", "fp16", "fp32")
MODES = ("graph", "eager")
MAX_REPEATS = 10_000
MAX_WARMUP = 1_000
MAX_GRID_POINTS = 10_000
MAX_THREADS = 4096
MAX_CONTEXT_TOKENS = 10**7
_MEMORY_SHARE = 0.9
"""Largest share of the device's free memory a profile may plan to use."""


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True, slots=True)
class Point:
    """One batch composition: a chunk of ``prefill_tokens`` after ``prefill_context`` cached tokens
    (none when 0) and ``decode_tokens`` decoders, each attending to ``decode_context`` KV entries
    (its own new one included)."""

    composition: str
    prefill_tokens: int
    prefill_context: int
    decode_tokens: int
    decode_context: int

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch."""
        return self.prefill_tokens + self.decode_tokens

    @property
    def n_requests(self) -> int:
        """Requests in the batch: the decoders, plus one with a chunk."""
        return self.decode_tokens + (1 if self.prefill_tokens else 0)

    @property
    def decode_slots(self) -> int:
        """KV entries the decoders read in all."""
        return self.decode_tokens * self.decode_context


@dataclass(frozen=True, slots=True)
class GridSpec:
    """The built-in grid: each composition at each token count ``n_tokens``.

    ``prefill``: one chunk of n, no prefix. ``decode``: n decoders. ``mixed50``/``mixed90``:
    round(0.5 n) / round(0.9 n) decoders plus a chunk of the rest after ``prefix`` cached tokens.
    Decoders read ``min(context, kv_cap // decoders)`` entries each (the KV volume is capped);
    ``decode_L4096`` is pure decode with ``long_context`` for n <= ``long_max_tokens``.
    """

    n_tokens: tuple[int, ...]
    compositions: tuple[str, ...] = COMPOSITIONS
    context: int = 1024
    prefix: int = 512
    kv_cap: int = 262_144
    long_context: int = 4096
    long_max_tokens: int = 64


CUDA_GRID = GridSpec(
    n_tokens=(16, 32, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096)
)
"""The H200 measurement's grid (166 rows there: 67 per model in graph mode)."""
CPU_GRID = GridSpec(
    n_tokens=(16, 32, 64, 128, 256),
    compositions=("prefill", "decode", "mixed50", "mixed90"),
    context=256,
    prefix=128,
    kv_cap=16_384,
)
"""A small grid for a CPU, where an iteration of a real model takes seconds."""


def make_grid(spec: GridSpec) -> list[Point]:
    """The points of ``spec``, by token count, then composition (the H200 table's order)."""
    for name in spec.compositions:
        if name not in COMPOSITIONS:
            raise ConfigError("compositions", name, f"unknown composition (known: {', '.join(COMPOSITIONS)})")
    for key in ("context", "prefix", "kv_cap", "long_context", "long_max_tokens"):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CONTEXT_TOKENS:
            raise ConfigError(key, value, f"must be an integer in [0, {MAX_CONTEXT_TOKENS}]")
    if spec.context < 1 or spec.kv_cap < 1:
        raise ConfigError("context", (spec.context, spec.kv_cap), "context and kv_cap must be >= 1")
    points: list[Point] = []
    for n in spec.n_tokens:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CONTEXT_TOKENS:
            raise ConfigError("n-tokens", n, f"must be an integer in [1, {MAX_CONTEXT_TOKENS}]")
        for name in spec.compositions:
            if name == "decode_L4096" and n > spec.long_max_tokens:
                continue
            decoders = {
                "prefill": 0,
                "decode": n,
                "decode_L4096": n,
                "mixed50": round(0.5 * n),
                "mixed90": round(0.9 * n),
            }[name]
            chunk = n - decoders
            top = spec.long_context if name == "decode_L4096" else spec.context
            context = max(1, min(top, spec.kv_cap // decoders)) if decoders else 0
            prefix = spec.prefix if name.startswith("mixed") and chunk else 0
            points.append(Point(name, chunk, prefix, decoders, context))
    return points


def read_grid(path: str | Path, model: str | None = None, mode: str | None = None) -> list[Point]:
    """Points from a CSV with ``n_prefill_tokens``, ``n_decode_tokens``, ``decode_context`` and
    ``prefill_context`` (``composition`` optional): a user's grid, or a measured table whose
    compositions are profiled again. With ``model``/``mode``, only rows whose ``model``/``mode``
    column (where there is one) equals them; ConfigError on ``grid`` when none is left."""
    table = read_csv_table(path, "grid", "grid file")
    table.require(("n_prefill_tokens", "n_decode_tokens", "decode_context", "prefill_context"))
    filters = {k: v for k, v in (("model", model), ("mode", mode)) if v is not None and k in table.columns}
    kept = table.where(filters)
    if not len(kept):
        raise ConfigError("grid", str(path), "no rows" + (f" with {filters}" if filters else ""))
    points: list[Point] = []
    for i in range(len(kept)):
        pre, dec, ctx, prefix = (
            kept.count(i, c)
            for c in ("n_prefill_tokens", "n_decode_tokens", "decode_context", "prefill_context")
        )
        name = kept.rows[i].get("composition") or ("prefill" if not dec else "decode" if not pre else "mixed")
        if pre + dec < 1:
            raise kept.cell_error(i, "n_prefill_tokens", "leaves a batch of 0 tokens")
        if dec and ctx < 1:
            raise kept.cell_error(i, "decode_context", "must be >= 1 with decoders (their own token)")
        if max(pre, dec, ctx, prefix) > MAX_CONTEXT_TOKENS:
            raise kept.cell_error(i, "n_prefill_tokens", f"values must be <= {MAX_CONTEXT_TOKENS}")
        points.append(Point(name, pre, prefix if pre else 0, dec, ctx if dec else 0))
    return points


def check_grid(points: Sequence[Point], budget: int) -> None:
    """ConfigError unless every point fits the token budget (an engine's batch limit ``b``), values
    are non-negative and there are at most :data:`MAX_GRID_POINTS` points."""
    if not points:
        raise ConfigError("grid", 0, "no points to profile")
    if len(points) > MAX_GRID_POINTS:
        raise ConfigError("grid", len(points), f"at most {MAX_GRID_POINTS} points")
    for p in points:
        for key in ("prefill_tokens", "prefill_context", "decode_tokens", "decode_context"):
            if getattr(p, key) < 0:
                raise ConfigError(key, getattr(p, key), f"must be >= 0 ({p.composition})")
        if p.prefill_tokens > budget:
            raise ConfigError(
                "prefill_tokens",
                p.prefill_tokens,
                f"prefill chunk above the budget {budget} ({p.composition})",
            )
        if p.n_tokens > budget:
            raise ConfigError("n_tokens", p.n_tokens, f"batch above the budget {budget} ({p.composition})")
        if p.n_tokens < 1:
            raise ConfigError("n_tokens", 0, f"a batch needs at least 1 token ({p.composition})")


# ---------------------------------------------------------------- torch


def torch_or_error() -> Any:
    """The torch module; ConfigError with the one-line install hint when it is not installed."""
    try:
        import torch
    except ImportError:
        raise ConfigError("profile", "torch", f"needs PyTorch, not installed: {INSTALL_HINT}") from None
    return torch


def resolve_device(torch: Any, device: str | None) -> str:
    """``cuda`` when available, else ``cpu``, for ``None``; ConfigError for CUDA without a GPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError("device", device, "must be cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", device, "CUDA is not available here (no GPU, or a CPU build of torch)")
    return device


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """How to measure: device, number type, graph or eager, warm-ups and timed repeats, the
    decoder layers built (``layers`` < the model's: extrapolated, see :func:`run_profile`) and, on
    CPU, torch's threads (None: torch's default)."""

    device: str = "cpu"
    dtype: str = "bf16"
    mode: str = "eager"
    warmup: int = 1
    repeats: int = 5
    layers: int | None = None
    seed: int = 0
    threads: int | None = None

    def check(self, shape: DecoderShape) -> int:
        """ConfigError on a bad setting; the number of layers to build."""
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, "must be graph or eager")
        if self.mode == "graph" and self.device != "cuda":
            raise ConfigError("mode", self.mode, "CUDA graphs exist on CUDA only; on CPU use --mode eager")
        if not 0 <= self.warmup <= MAX_WARMUP:
            raise ConfigError("warmup", self.warmup, f"must be in [0, {MAX_WARMUP}]")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ConfigError("threads", self.threads, f"must be in [1, {MAX_THREADS}]")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ConfigError("repeats", self.repeats, f"must be in [1, {MAX_REPEATS}]")
        layers = shape.layers if self.layers is None else self.layers
        if not 1 <= layers <= shape.layers:
            raise ConfigError("layers", layers, f"must be in [1, {shape.layers}] ({shape.name})")
        return layers

    def timing(self, layers: int, total_layers: int, threads: int) -> str:
        """The ``timing`` column: how each time was taken (no commas)."""
        if self.device == "cuda":
            how = "cuda-graph replay" if self.mode == "graph" else "eager forward"
            text = f"{how} timed by cuda events; warmup={self.warmup} repeats={self.repeats}"
        else:
            text = (
                f"eager forward timed by wall clock (no cuda graphs on cpu); warmup={self.warmup} "
                f"repeats={self.repeats} threads={threads}"
            )
        if layers < total_layers:
            text += f"; {layers} of {total_layers} layers timed and scaled"
        return text


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _bytes_per(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def memory_bytes(shape: DecoderShape, points: Sequence[Point], layers: int, dtype: str) -> int:
    """Rough bytes a profile allocates: weights of ``layers`` layers, embedding and LM head, the
    KV regions, and activations of the largest batch (intermediate-wide, a few copies)."""
    per = _bytes_per(dtype)
    weights = layers * shape.layer_parameters() + 2 * shape.vocab * shape.hidden + shape.hidden
    decode_slots = max(p.decode_slots for p in points)
    prefill_slots = max(p.prefill_context + p.prefill_tokens for p in points)
    kv = 2 * layers * (decode_slots + prefill_slots) * shape.kv_heads * shape.head_dim
    n = max(p.n_tokens for p in points)
    width = shape.intermediate * (shape.experts_per_token if shape.moe else 1)
    rows = max(p.n_requests for p in points)
    activations = 6 * n * (shape.hidden + 2 * width) + 2 * rows * shape.vocab
    return per * (weights + kv + activations)


def _free_bytes(torch: Any, device: str) -> int:
    """Free memory of the device (CPU: MemAvailable, else total physical memory)."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class _Decoder:
    """The decoder's tensors on the device (random values) and one iteration's forward pass."""

    def __init__(
        self,
        torch: Any,
        shape: DecoderShape,
        layers: int,
        points: Sequence[Point],
        device: str,
        dtype: Any,
        seed: int,
    ) -> None:
        self.torch, self.shape, self.device, self.dtype = torch, shape, device, dtype
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

        def weight(*size: int, std: float = 0.02) -> Any:
            return torch.empty(*size, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

        def ones(size: int) -> Any:
            return torch.ones(size, device=device, dtype=dtype)

        s = shape
        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim
        decode_slots = max(p.decode_slots for p in points)
        prefill_slots = max(p.prefill_context + p.prefill_tokens for p in points)
        self.layers: list[dict[str, Any]] = []
        for _ in range(layers):
            w: dict[str, Any] = {
                "norm1": ones(s.hidden),
                "qkv": weight(qkv_out, s.hidden),
                "o": weight(s.hidden, s.heads * s.head_dim),
                "norm2": ones(s.hidden),
            }
            if s.moe:
                w["router"] = weight(s.experts, s.hidden)
                w["gate_up"] = weight(s.experts, s.hidden, 2 * s.intermediate)
                w["down"] = weight(s.experts, s.intermediate, s.hidden)
            else:
                w["gate_up"] = weight(2 * s.intermediate, s.hidden)
                w["down"] = weight(s.hidden, s.intermediate)
            # KV regions of this layer, random contents: decoders' slots and the chunk's prefix + itself
            w["kv_decode"] = weight(2, max(decode_slots, 1) * s.kv_heads * s.head_dim, std=1.0)
            w["kv_prefill"] = weight(2, 1, s.kv_heads, max(prefill_slots, 1), s.head_dim, std=1.0)
            self.layers.append(w)
        self.embed = weight(s.vocab, s.hidden)
        self.final_norm = ones(s.hidden)
        self.lm_head = self.embed if s.tied_embeddings else weight(s.vocab, s.hidden)
        inv = 1.0 / (
            s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim)
        )
        self.inv_freq = inv
        self.generator = gen

    def inputs(self, point: Point) -> dict[str, Any]:
        """The static inputs of one point: token ids, rotary tables, the chunk's mask, logit rows."""
        torch, s = self.torch, self.shape
        n, m, d = point.n_tokens, point.prefill_tokens, point.decode_tokens
        positions = torch.cat(
            [
                torch.arange(point.prefill_context, point.prefill_context + m, device=self.device),
                torch.full((d,), max(point.decode_context - 1, 0), device=self.device),
            ]
        ).to(torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        mask = None
        if m and point.prefill_context:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(m, point.prefill_context + m)
        rows = ([m - 1] if m else []) + list(range(m, n))
        return {
            "ids": torch.randint(0, s.vocab, (n,), device=self.device, generator=self.generator),
            "cos": angles.cos().to(self.dtype)[:, None, :],
            "sin": angles.sin().to(self.dtype)[:, None, :],
            "mask": mask,
            "rows": torch.tensor(rows, device=self.device, dtype=torch.long),
            "point": point,
        }

    def forward(self, batch: dict[str, Any], layers: int) -> Any:
        """One iteration through the first ``layers`` layers; the logits of each request's last token."""
        torch, s = self.torch, self.shape
        functional = torch.nn.functional
        point: Point = batch["point"]
        m, d = point.prefill_tokens, point.decode_tokens
        prefix, context = point.prefill_context, point.decode_context
        n = m + d
        hq, hkv, hd = s.heads, s.kv_heads, s.head_dim
        cos, sin = batch["cos"], batch["sin"]
        x = functional.embedding(batch["ids"], self.embed)
        for w in self.layers[:layers]:
            h = functional.rms_norm(x, (s.hidden,), w["norm1"], s.rms_eps)
            q, k, v = functional.linear(h, w["qkv"]).split((hq * hd, hkv * hd, hkv * hd), dim=-1)
            q, k, v = q.view(n, hq, hd), k.view(n, hkv, hd), v.view(n, hkv, hd)
            q = q * cos + _rotate_half(torch, q) * sin
            k = k * cos + _rotate_half(torch, k) * sin
            parts = []
            if m:
                cache = w["kv_prefill"]  # [2, 1, kv_heads, slots, head_dim]
                cache[0, 0, :, prefix : prefix + m] = k[:m].transpose(0, 1)
                cache[1, 0, :, prefix : prefix + m] = v[:m].transpose(0, 1)
                query = q[:m].transpose(0, 1).unsqueeze(0)
                keys, values = cache[0, :, :, : prefix + m], cache[1, :, :, : prefix + m]
                if batch["mask"] is None:
                    out = functional.scaled_dot_product_attention(
                        query, keys, values, is_causal=True, enable_gqa=True
                    )
                else:
                    out = functional.scaled_dot_product_attention(
                        query, keys, values, attn_mask=batch["mask"], enable_gqa=True
                    )
                parts.append(out[0].transpose(0, 1).reshape(m, hq * hd))
            if d:
                used = d * context * hkv * hd
                keys = w["kv_decode"][0, :used].view(d, context, hkv, hd)
                values = w["kv_decode"][1, :used].view(d, context, hkv, hd)
                keys[:, context - 1] = k[m:]
                values[:, context - 1] = v[m:]
                # the query heads of each KV group ride in the query-length dimension
                query = q[m:].view(d, hkv, s.query_groups, hd)
                out = functional.scaled_dot_product_attention(
                    query, keys.transpose(1, 2), values.transpose(1, 2)
                )
                parts.append(out.reshape(d, hq * hd))
            attention = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + functional.linear(attention, w["o"])
            h = functional.rms_norm(x, (s.hidden,), w["norm2"], s.rms_eps)
            x = x + (self._moe(h, w) if s.moe else self._mlp(h, w))
        last = functional.rms_norm(x[batch["rows"]], (s.hidden,), self.final_norm, s.rms_eps)
        return functional.linear(last, self.lm_head)

    def _mlp(self, h: Any, w: dict[str, Any]) -> Any:
        """SwiGLU: fused gate/up projection, silu(gate) * up, down projection."""
        functional = self.torch.nn.functional
        gate, up = functional.linear(h, w["gate_up"]).chunk(2, dim=-1)
        return functional.linear(functional.silu(gate) * up, w["down"])

    def _moe(self, h: Any, w: dict[str, Any]) -> Any:
        """Mixture of experts with static shapes (so a CUDA graph can hold it): softmax router, top-k,
        each expert given a capacity of ceil(n k / E) token slots (a balanced load), the experts'
        SwiGLU as batched products over [E, capacity, hidden]; overflowing tokens are dropped."""
        torch, s = self.torch, self.shape
        functional = torch.nn.functional
        n, k, experts = h.shape[0], s.experts_per_token, s.experts
        capacity = math.ceil(n * k / experts)
        weights, chosen = torch.topk(functional.linear(h, w["router"]).float().softmax(dim=-1), k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype).reshape(-1)
        expert = chosen.reshape(-1)
        onehot = (expert[:, None] == torch.arange(experts, device=h.device)).to(torch.int32)
        rank = (onehot.cumsum(0) - 1).gather(1, expert[:, None])[:, 0]
        kept = rank < capacity
        slot = torch.where(kept, expert * capacity + rank, torch.full_like(rank, experts * capacity))
        tokens = torch.arange(n * k, device=h.device) // k
        grid = torch.zeros(experts * capacity + 1, s.hidden, device=h.device, dtype=h.dtype)
        grid.index_copy_(0, slot, h[tokens])
        grouped = grid[:-1].view(experts, capacity, s.hidden)
        gate, up = torch.bmm(grouped, w["gate_up"]).chunk(2, dim=-1)
        out = torch.bmm(functional.silu(gate) * up, w["down"]).reshape(experts * capacity, s.hidden)
        out = torch.cat([out, out.new_zeros(1, s.hidden)])
        mixed = out[slot] * (weights * kept.to(h.dtype))[:, None]
        return mixed.view(n, k, s.hidden).sum(dim=1)


def _rotate_half(torch: Any, x: Any) -> Any:
    """Rotary embedding's half rotation: (x1, x2) -> (-x2, x1) along the head dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _timed(torch: Any, run: Callable[[], Any], settings: ProfileSettings) -> list[float]:
    """``repeats`` times in ms of ``run`` after its warm-ups, as :class:`ProfileSettings` says."""
    if settings.device == "cpu":
        for _ in range(settings.warmup):
            run()
        times = []
        for _ in range(settings.repeats):
            start = time.perf_counter_ns()
            run()
            times.append((time.perf_counter_ns() - start) / 1e6)
        return times
    cuda = torch.cuda
    side = cuda.Stream()
    side.wait_stream(cuda.current_stream())
    with cuda.stream(side):
        run()  # eager warm-up: kernels chosen, workspaces allocated, before any capture
    cuda.current_stream().wait_stream(side)
    cuda.synchronize()
    graph = None
    step = run
    if settings.mode == "graph":
        graph = cuda.CUDAGraph()
        with cuda.graph(graph):
            run()
        step = graph.replay
    for _ in range(settings.warmup):
        step()
    pairs = [
        (cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)) for _ in range(settings.repeats)
    ]
    for start, end in pairs:
        start.record()
        step()
        end.record()
    cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in pairs]
    del graph
    return times


@dataclass(frozen=True, slots=True)
class ProfileRow:
    """One measured point: its composition, the median/min/max ms and how it was measured."""

    model: str
    gpu_name: str
    torch_version: str
    point: Point
    median_ms: float
    min_ms: float
    max_ms: float
    mode: str
    device: str
    dtype: str
    tp: int
    layers_timed: str
    timing: str

    def cells(self) -> dict[str, Any]:
        """The row by :data:`CSV_COLUMNS`."""
        p = self.point
        return {
            "model": self.model,
            "gpu_name": self.gpu_name,
            "torch_version": self.torch_version,
            "n_tokens": p.n_tokens,
            "n_prefill_tokens": p.prefill_tokens,
            "n_decode_tokens": p.decode_tokens,
            "n_requests": p.n_requests,
            "decode_context": p.decode_context,
            "prefill_context": p.prefill_context,
            "median_ms": round(self.median_ms, 4),
            "min_ms": round(self.min_ms, 4),
            "max_ms": round(self.max_ms, 4),
            "composition": p.composition,
            "mode": self.mode,
            "device": self.device,
            "dtype": self.dtype,
            "tp": self.tp,
            "layers_timed": self.layers_timed,
            "timing": self.timing,
        }


def _device_name(torch: Any, device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if device == "cuda":
        return str(torch.cuda.get_device_name())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@dataclass
class ProfileRun:
    """What :func:`run_profile` measured, and on what."""

    rows: list[ProfileRow] = field(default_factory=list)
    device_name: str = ""
    torch_version: str = ""
    timing: str = ""
    layers_timed: int = 0
    seconds: float = 0.0


def run_profile(
    shape: DecoderShape,
    points: Sequence[Point],
    settings: ProfileSettings,
    *,
    name: str | None = None,
    progress: Callable[[ProfileRow], None] | None = None,
) -> ProfileRun:
    """Build ``shape`` (random weights) and time one iteration per point; one row each.

    With ``settings.layers`` = K below the model's L layers, each point is timed twice, through K
    layers (the repeats ``t_K``) and through none (embedding, final norm and LM head: median
    ``t_0``); each repeat is reported as ``t_0 + (L / K) (t_K - t_0)`` (every layer has the same
    shapes), at least ``t_K`` (:func:`_scaled`).
    ConfigError: missing torch, a bad setting, CUDA without a GPU, or a model and grid that would
    not fit in the device's free memory.
    """
    torch = torch_or_error()
    device = resolve_device(torch, settings.device)
    settings = dataclasses.replace(settings, device=device)
    layers = settings.check(shape)
    if not points:
        raise ConfigError("grid", 0, "no points to profile")
    need, free = memory_bytes(shape, points, layers, settings.dtype), _free_bytes(torch, device)
    if need > _MEMORY_SHARE * free:
        raise ConfigError(
            "layers",
            layers,
            f"{shape.name} with this grid needs about {need / 2**30:.1f} GiB, "
            f"{device} has {free / 2**30:.1f} GiB free: build fewer layers "
            "(--layers) or use a smaller grid",
        )
    with _threads(torch, settings.threads if device == "cpu" else None):
        result = _run(torch, shape, points, settings, layers, name, progress)
    if device == "cuda":
        torch.cuda.empty_cache()  # the model's tensors are gone with _run's frame
    return result


@contextlib.contextmanager
def _threads(torch: Any, threads: int | None) -> Any:
    """torch's CPU threads set to ``threads`` for the block (unchanged for None), then restored."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(
    torch: Any,
    shape: DecoderShape,
    points: Sequence[Point],
    settings: ProfileSettings,
    layers: int,
    name: str | None,
    progress: Callable[[ProfileRow], None] | None,
) -> ProfileRun:
    """:func:`run_profile` once the settings are checked."""
    device = settings.device
    started = time.perf_counter()
    dtype = getattr(torch, _TORCH_DTYPES[settings.dtype])
    result = ProfileRun(
        device_name=_device_name(torch, device),
        torch_version=str(torch.__version__),
        timing=settings.timing(layers, shape.layers, torch.get_num_threads()),
        layers_timed=layers,
    )
    with torch.inference_mode():
        model = _Decoder(torch, shape, layers, points, device, dtype, settings.seed)
        for point in points:
            batch = model.inputs(point)
            times = _timed(torch, lambda b=batch: model.forward(b, layers), settings)
            if layers < shape.layers:
                base_ms = statistics.median(_timed(torch, lambda b=batch: model.forward(b, 0), settings))
                times = _scaled(times, base_ms, shape.layers / layers)
            summary = _summary(times)
            row = ProfileRow(
                name or shape.name,
                result.device_name,
                result.torch_version,
                point,
                *summary,
                settings.mode,
                device,
                settings.dtype,
                shape.tp,
                f"{layers}/{shape.layers}",
                result.timing,
            )
            result.rows.append(row)
            if progress is not None:
                progress(row)
    result.seconds = time.perf_counter() - started
    return result


def _scaled(times_ms: Sequence[float], base_ms: float, scale: float) -> list[float]:
    """Repeats through K of L layers extrapolated to all: ``base + scale (t - base)``, at least ``t``
    (``scale`` = L / K >= 1; increasing in ``t``, so median, min and max keep their order)."""
    return [max(base_ms + scale * (t - base_ms), t) for t in times_ms]


def _summary(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the timed repeats."""
    return float(statistics.median(times)), float(min(times)), float(max(times))


# ---------------------------------------------------------------- the table


def rows_csv(rows: Sequence[ProfileRow]) -> str:
    """The rows as CSV text with a header (:data:`CSV_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.cells())
    return buffer.getvalue()


def write_rows(rows: Sequence[ProfileRow], path: str | Path) -> Path:
    """Write the table to ``path`` whole (or not at all)."""
    atomic_write_text(path, rows_csv(rows))
    return Path(path)


# ---------------------------------------------------------------- comparison


_KEY_COLUMNS = ("model", "mode", "n_prefill_tokens", "n_decode_tokens", "decode_context", "prefill_context")


@dataclass(frozen=True, slots=True)
class CompositionError:
    """How far our medians are from a reference table's, over the points of one composition:
    the median and largest of |ours / theirs - 1|, and the median of ours / theirs."""

    model: str
    composition: str
    points: int
    median_rel_error: float
    max_rel_error: float
    median_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "model": self.model,
            "composition": self.composition,
            "points": self.points,
            "median_rel_error": self.median_rel_error,
            "max_rel_error": self.max_rel_error,
            "median_ratio": self.median_ratio,
        }


def compare_tables(ours: str | Path, theirs: str | Path) -> list[CompositionError]:
    """Our table against a reference in the same format, point by point (same model, mode, chunk,
    prefix, decoders and context), summarised per (model, composition) and per model (``all``).

    ConfigError on ``compare`` when no point of ours is in the reference.
    """
    mine = read_csv_table(ours, "compare", "profile table")
    reference = read_csv_table(theirs, "compare", "reference table")
    for table in (mine, reference):
        table.require((*_KEY_COLUMNS, "median_ms", "composition"))
    measured: dict[tuple[str, ...], float] = {}
    for i, row in enumerate(reference.rows):
        measured[tuple(row[c] for c in _KEY_COLUMNS)] = reference.number(i, "median_ms")
    ratios: dict[tuple[str, str], list[float]] = {}
    for i, row in enumerate(mine.rows):
        theirs_ms = measured.get(tuple(row[c] for c in _KEY_COLUMNS))
        if theirs_ms is None or theirs_ms <= 0:
            continue
        ratio = mine.number(i, "median_ms") / theirs_ms
        ratios.setdefault((row["model"], row["composition"]), []).append(ratio)
        ratios.setdefault((row["model"], "all"), []).append(ratio)
    if not ratios:
        raise ConfigError(
            "compare",
            str(theirs),
            "no point of the profile is in the reference table (match on model, mode, tokens and contexts)",
        )
    return [
        CompositionError(
            model,
            name,
            len(r),
            float(statistics.median(abs(x - 1) for x in r)),
            float(max(abs(x - 1) for x in r)),
            float(statistics.median(r)),
        )
        for (model, name), r in sorted(ratios.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1]))
    ]

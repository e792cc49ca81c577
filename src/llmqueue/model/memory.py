"""KV-cache memory of one engine: its size in tokens and blocks, and how it is derived.

A request holds ``ceil(cached / block)`` blocks for the ``cached`` tokens whose keys and values
it has computed (prompt tokens, then one per decoded token). The engine admits a new request only
when the blocks its first chunk needs leave at least the watermark free, and preempts the newest
running request (recompute, as vLLM does) when a running one cannot grow. The size ``M`` comes
directly (``tokens=``) or from the GPU memory left after the weights, as vLLM sizes its pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import split_items
from llmqueue.limits import MAX_GPU_GIB, MAX_KV_TOKENS

__all__ = ["KVCache", "ModelShape", "kv_bytes_per_token", "parse_memory"]

_FIELD = "memory"
GIB = 1024**3


_HIGH = {"tokens": MAX_KV_TOKENS, "block": 2**20, "gpu_gib": MAX_GPU_GIB, "reserved_gib": MAX_GPU_GIB,
         "params_billion": 1e6, "layers": 10**6, "kv_heads": 10**6, "head_dim": 10**6, "dtype_bytes": 64,
         "tp": 10**5}
"""Upper bounds of the cache's parameters (llmqueue.limits; the shapes' far beyond any model)."""


def _number(key: str, value: object, *, low: float, integer: bool = False,
            low_open: bool = False) -> float:
    """``value`` as a finite number >= low (> low when ``low_open``) and at most its bound in
    ``_HIGH``, else ConfigError on ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"{_FIELD}.{key}", value, "must be a number")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{_FIELD}.{key}", value, "must be a number") from None
    if not math.isfinite(x) or (x <= low if low_open else x < low):
        raise ConfigError(f"{_FIELD}.{key}", value, f"must be {'>' if low_open else '>='} {low:g}")
    high = _HIGH.get(key, math.inf)
    if x > high:
        raise ConfigError(f"{_FIELD}.{key}", value, f"must be <= {high:g}")
    if integer and not x.is_integer():
        raise ConfigError(f"{_FIELD}.{key}", value, "must be an integer")
    return x


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What sets a model's KV bytes per token and its weight bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    params_billion: float = 0.0

    def __post_init__(self) -> None:
        for key in ("layers", "kv_heads", "head_dim", "dtype_bytes"):
            object.__setattr__(self, key, int(_number(key, getattr(self, key), low=1, integer=True)))
        object.__setattr__(self, "params_billion", _number("params_billion", self.params_billion, low=0))

    @property
    def weight_bytes(self) -> float:
        """Bytes of the weights at this dtype."""
        return self.params_billion * 1e9 * self.dtype_bytes


def kv_bytes_per_token(shape: ModelShape, tensor_parallel: int = 1) -> float:
    """Bytes of K and V one token takes on one GPU: 2 * layers * kv_heads * head_dim * dtype / tp.

    KV heads are split across tensor-parallel GPUs (replicated when fewer heads than GPUs).
    """
    tp = int(_number("tp", tensor_parallel, low=1, integer=True))
    heads_per_gpu = max(shape.kv_heads / tp, 1.0)
    return 2.0 * shape.layers * heads_per_gpu * shape.head_dim * shape.dtype_bytes


@dataclass(frozen=True, slots=True)
class KVCache:
    """An engine's KV cache: ``capacity_tokens`` in blocks of ``block_tokens``; a new request is
    admitted only if ``watermark`` (a fraction of all blocks) stays free afterwards."""

    capacity_tokens: int
    block_tokens: int = 16
    watermark: float = 0.01
    source: str = ""

    def __post_init__(self) -> None:
        block = int(_number("block", self.block_tokens, low=1, integer=True))
        tokens = int(_number("tokens", self.capacity_tokens, low=block, integer=True))
        watermark = _number("watermark", self.watermark, low=0)
        if watermark >= 1:
            raise ConfigError(f"{_FIELD}.watermark", self.watermark, "must be < 1")
        object.__setattr__(self, "block_tokens", block)
        object.__setattr__(self, "capacity_tokens", tokens)
        object.__setattr__(self, "watermark", watermark)

    @property
    def total_blocks(self) -> int:
        """Blocks in the pool."""
        return self.capacity_tokens // self.block_tokens

    @property
    def watermark_blocks(self) -> int:
        """Blocks that admission keeps free."""
        return int(self.watermark * self.total_blocks)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that ``tokens`` cached tokens occupy."""
        return -(-tokens // self.block_tokens)

    def fits_alone(self, tokens: int) -> bool:
        """Whether one request of ``tokens`` total tokens can ever complete in an empty pool."""
        return self.blocks_for(tokens) <= self.total_blocks - self.watermark_blocks

    @classmethod
    def from_gpu(cls, gpu_memory_gib: float, shape: ModelShape, *, tensor_parallel: int = 1,
                 utilization: float = 0.9, reserved_gib: float = 0.0, block_tokens: int = 16,
                 watermark: float = 0.01) -> KVCache:
        """vLLM's sizing: ``utilization`` of each GPU's memory, minus its share of the weights and
        ``reserved_gib`` (activations, CUDA graphs), divided by the KV bytes per token."""
        gpu = _number("gpu_gib", gpu_memory_gib, low=0, low_open=True)
        util = _number("utilization", utilization, low=0, low_open=True)
        if util > 1:
            raise ConfigError(f"{_FIELD}.utilization", utilization, "must be <= 1")
        reserved = _number("reserved_gib", reserved_gib, low=0)
        tp = int(_number("tp", tensor_parallel, low=1, integer=True))
        block = int(_number("block", block_tokens, low=1, integer=True))
        free = gpu * util * GIB - shape.weight_bytes / tp - reserved * GIB
        per_token = kv_bytes_per_token(shape, tp)
        tokens = int(free // per_token) if free > 0 else 0
        if tokens < block:
            raise ConfigError(
                _FIELD, f"gpu_gib={gpu:g}",
                f"no room for the KV cache: weights and reserve leave {free / GIB:.2f} GiB",
            )
        source = (f"gpu_gib={gpu:g},util={util:g},params_b={shape.params_billion:g},"
                  f"layers={shape.layers},kv_heads={shape.kv_heads},head_dim={shape.head_dim},"
                  f"dtype_bytes={shape.dtype_bytes},tp={tp},reserved_gib={reserved:g}")
        return cls(tokens - tokens % block, block, watermark, source)

    @property
    def spec(self) -> str:
        """Canonical text that :func:`parse_memory` reads back into an equal pool."""
        return f"tokens={self.capacity_tokens},block={self.block_tokens},watermark={self.watermark:g}"


_GPU_KEYS = {"gpu_gib", "params_b", "layers", "kv_heads", "head_dim", "dtype_bytes", "tp", "util",
             "reserved_gib"}
_COMMON_KEYS = {"block", "watermark"}


def parse_memory(spec: str) -> KVCache:
    """``tokens=M[,block=16,watermark=0.01]`` or ``gpu_gib=..,params_b=..,layers=..,kv_heads=..,
    head_dim=..[,dtype_bytes=2,tp=1,util=0.9,reserved_gib=0,block=..,watermark=..]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(_FIELD, spec, "expected 'tokens=M[,block=16,watermark=0.01]' or a gpu_gib=... spec")
    items = split_items(spec, spec, _FIELD)[1]
    known = {"tokens"} | _GPU_KEYS | _COMMON_KEYS
    unknown = [k for k in items if k not in known]
    if unknown:
        raise ConfigError(_FIELD, spec, f"unknown key {unknown[0]!r} (keys: {', '.join(sorted(known))})")
    common = {"block_tokens": items.get("block", 16), "watermark": items.get("watermark", 0.01)}
    if "tokens" in items:
        extra = [k for k in items if k in _GPU_KEYS]
        if extra:
            raise ConfigError(_FIELD, spec, f"give tokens= or the GPU keys, not both (found {extra[0]!r})")
        return KVCache(items["tokens"], **common)  # type: ignore[arg-type]
    for key in ("gpu_gib", "params_b", "layers", "kv_heads", "head_dim"):
        if key not in items:
            raise ConfigError(_FIELD, spec, f"missing key {key!r} (or give tokens=)")
    shape = ModelShape(items["layers"], items["kv_heads"], items["head_dim"],  # type: ignore[arg-type]
                       items.get("dtype_bytes", 2), items["params_b"])  # type: ignore[arg-type]
    return KVCache.from_gpu(
        items["gpu_gib"], shape, tensor_parallel=items.get("tp", 1),  # type: ignore[arg-type]
        utilization=items.get("util", 0.9), reserved_gib=items.get("reserved_gib", 0.0),  # type: ignore[arg-type]
        **common,  # type: ignore[arg-type]
    )


def as_memory(memory: object, field: str = "memory") -> KVCache | None:
    """A KV cache from a KVCache, its spec text (``tokens=M,...``, ``gpu_gib=...``) or None
    (unlimited, also the word ``none``); ConfigError naming ``field`` for anything else."""
    if memory is None or isinstance(memory, KVCache):
        return memory
    if isinstance(memory, str):
        return None if memory.strip().lower() == "none" else parse_memory(memory)
    raise ConfigError(field, memory, "must be a KVCache, its spec text 'tokens=M[,block=16,"
                      "watermark=0.01]' or None")

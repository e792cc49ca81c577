"""The batch-size-limit stability region of §4 as an object: vertices, loads, the binding face, vertex C.

**Units: token rates in this module's public API are tokens per second** (``theory`` works in
tokens per ms); request rates are requests per second. The region is the downward-closed convex
hull of the rate vectors ``(x, y) / t(x + y)`` of the feasible batches (``x`` prefill, ``y``
decode tokens, ``x + y <= b``, ``y + 1{x > 0} <= k_max``), **(reconstructed, PAPER.md §4)**.
Without ``k_max`` it is the triangle ``x + y <= max_n n / t(n)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.io.plotting import pyplot, save
from llmqueue.model.batchtime import BatchTime
from llmqueue.theory import capacity as theory

__all__ = ["Exit", "OperatingPoint", "Point", "Region", "plot_region", "region"]

# Relative distance under which a ray's crossing counts as passing through a vertex.
_AT_VERTEX_REL = 1e-9
# Loads within this of 1 are drawn as on the boundary (the theorems do not decide them).
_ON_BOUNDARY = 1e-9


def _rate(value: object, field_name: str) -> float:
    """``value`` as a finite float >= 0 (not a bool), else ConfigError naming ``field_name``."""
    if isinstance(value, bool):
        raise ConfigError(field_name, value, "must be a finite number >= 0")
    return theory._nonneg(value, field_name)


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """A workload's mean demand: requests/s with mean prefill and decode tokens per request."""

    rate_per_s: float
    mean_prefill_tokens: float
    mean_decode_tokens: float

    def __post_init__(self) -> None:
        _rate(self.rate_per_s, "rate_per_s")
        _rate(self.mean_prefill_tokens, "mean_prefill_tokens")
        _rate(self.mean_decode_tokens, "mean_decode_tokens")

    @property
    def token_rates_per_s(self) -> tuple[float, float]:
        """(lambda m_p, lambda m_d): the prefill and decode token rates in tokens/s."""
        return (self.rate_per_s * self.mean_prefill_tokens, self.rate_per_s * self.mean_decode_tokens)

    def scaled(self, factor: float) -> OperatingPoint:
        """The same request mix at ``factor`` times the arrival rate (a point on the same ray)."""
        return OperatingPoint(
            self.rate_per_s * _rate(factor, "factor"), self.mean_prefill_tokens, self.mean_decode_tokens
        )


Point = OperatingPoint | tuple[float, float]
"""An operating point, or its (prefill, decode) token rates in tokens/s."""


def _token_rates(point: Point) -> np.ndarray:
    """(prefill, decode) tokens/s of ``point``, validated."""
    if isinstance(point, OperatingPoint):
        return np.array(point.token_rates_per_s, dtype=np.float64)
    try:
        p, d = point
    except (TypeError, ValueError):
        raise ConfigError(
            "point", point, "must be an OperatingPoint or (prefill, decode) tokens/s"
        ) from None
    return np.array([_rate(p, "prefill_tokens_per_s"), _rate(d, "decode_tokens_per_s")])


@dataclass(frozen=True, slots=True)
class Exit:
    """Where the ray from the origin through an operating point leaves the region.

    ``face`` holds the indices of the two consecutive vertices bounding the face crossed, or
    ``(i, i)`` for the horizontal (vertical) edge that closes the region beyond the first (last)
    vertex when that vertex is off the axis. ``vertex`` is the face's end nearest the crossing,
    ``batch`` its batch composition (prefill, decode tokens); ``at_vertex`` is True when the ray
    passes through that vertex (within a relative 1e-9), so only that batch type can carry the load.
    """

    load: float
    point_tokens_per_s: tuple[float, float]
    face: tuple[int, int]
    vertex: int
    batch: tuple[int, int]
    at_vertex: bool


@dataclass(frozen=True, slots=True)
class Region:
    """The §4 stability region of (bt, budget, k_max); build it with :func:`region`.

    ``vertices_tokens_per_s``: the outer boundary's vertices as (prefill, decode) tokens/s, by
    increasing prefill rate; ``vertex_batches``: the batch (prefill, decode tokens) whose rate
    vector each vertex is. ``vertex_c_index`` indexes vertex C, or is None when it does not exist.
    """

    batch_time: BatchTime = field(repr=False)
    budget: int
    k_max: int | None
    vertices_tokens_per_s: tuple[tuple[float, float], ...]
    vertex_batches: tuple[tuple[int, int], ...]
    vertex_c_index: int | None
    capacity_tokens_per_s: float
    max_capacity_tokens_per_s: float

    @property
    def vertices(self) -> np.ndarray:
        """The vertices as an (m, 2) array of (prefill, decode) tokens/s."""
        return np.array(self.vertices_tokens_per_s, dtype=np.float64).reshape(-1, 2)

    @property
    def vertex_c(self) -> tuple[float, float] | None:
        """Vertex C in tokens/s: the decode-heavy corner whose batches hold k_max requests.

        It is the vertex next to the top (most-decode) one when that neighbour is a mixed batch of
        ``k_max - 1`` decode tokens and one prefill request; None without a batch-size limit that
        binds (``k_max`` None or ``k_max >= b``: the region is a triangle).
        """
        if self.vertex_c_index is None:
            return None
        return self.vertices_tokens_per_s[self.vertex_c_index]

    @property
    def vertex_c_batch(self) -> tuple[int, int] | None:
        """Vertex C's batch: (prefill, decode) tokens, e.g. (29, 99) for b = 128, k_max = 100."""
        return None if self.vertex_c_index is None else self.vertex_batches[self.vertex_c_index]

    def vertex_c_operating_point(self, multiple: int = 10) -> OperatingPoint | None:
        """Requests of ``multiple`` times vertex C's batch, at the rate that lands exactly on C.

        The paper's experiment (b = 128, k_max = 100) uses ``multiple = 10``: 290 + 990 tokens, one
        request every 467.5 ms (2.139037 requests/s). Any multiple gives the same token rates.
        """
        if self.vertex_c_index is None:
            return None
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ConfigError("multiple", multiple, "must be an integer >= 1")
        x, y = self.vertex_batches[self.vertex_c_index]
        prefill_per_s = self.vertices_tokens_per_s[self.vertex_c_index][0]
        return OperatingPoint(prefill_per_s / (multiple * x), float(multiple * x), float(multiple * y))

    def load(self, point: Point) -> float:
        """The smallest rho with point / rho inside the region (``theory.kmax_load``); < 1 is inside."""
        p, d = _token_rates(point) / 1000.0
        return theory.kmax_load(p, d, self.batch_time, self.budget, self.k_max)

    def contains(self, point: Point, margin: float = 0.0) -> bool:
        """True when ``load(point) <= 1 - margin`` (``margin`` in [0, 1): a relative safety margin)."""
        m = _rate(margin, "margin")
        if m >= 1:
            raise ConfigError("margin", margin, "must be in [0, 1)")
        return self.load(point) <= 1.0 - m

    def rate_at_load(self, point: OperatingPoint, target_load: float) -> float:
        """The arrival rate (requests/s) of ``point``'s request mix at region load ``target_load``."""
        if not isinstance(point, OperatingPoint):
            raise ConfigError("point", point, "must be an OperatingPoint (a request mix)")
        target = _rate(target_load, "load")
        rho = self.load(point)
        if rho == 0:
            raise ConfigError("point", point, "has zero token rate: no ray to scale along")
        return point.rate_per_s * target / rho

    def exit(self, point: Point) -> Exit:
        """The face and vertex through which ``point``'s ray leaves the region (which batch binds).

        Computed from the vertex chain directly (the largest ratio a.p / c over the boundary's
        supporting lines a.z <= c), independently of the linear program in ``theory.kmax_load``.
        """
        p = _token_rates(point)
        if not p.any():
            raise ConfigError("point", point, "has zero token rate: its ray has no direction")
        v = self.vertices
        m = len(v)
        # supporting lines a.z <= c: the top edge, the faces between vertices, the right edge
        normals = [np.array([0.0, 1.0])]
        offsets = [v[0, 1]]
        faces = [(0, 0)]
        for i in range(m - 1):
            a = np.array([v[i, 1] - v[i + 1, 1], v[i + 1, 0] - v[i, 0]])
            normals.append(a)
            offsets.append(float(a @ v[i]))
            faces.append((i, i + 1))
        normals.append(np.array([1.0, 0.0]))
        offsets.append(v[-1, 0])
        faces.append((m - 1, m - 1))
        ratios = np.array([float(a @ p) / c for a, c in zip(normals, offsets, strict=True)])
        k = int(np.argmax(ratios))
        rho = float(ratios[k])
        crossing = p / rho
        i, j = faces[k]
        dist = np.linalg.norm(v[[i, j]] - crossing, axis=1)
        nearest = (i, j)[int(np.argmin(dist))]
        at_vertex = float(dist.min()) <= _AT_VERTEX_REL * float(np.abs(v).max())
        return Exit(
            load=rho,
            point_tokens_per_s=(float(crossing[0]), float(crossing[1])),
            face=(i, j),
            vertex=nearest,
            batch=self.vertex_batches[nearest],
            at_vertex=at_vertex,
        )


def _compositions(bt: BatchTime, budget: int, k_max: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The candidate batches (x, y) of ``theory.region_vertices`` and their rates in tokens/ms."""
    n = np.arange(1, budget + 1, dtype=np.int64)
    t = np.asarray(bt.times_ms(n), dtype=np.float64)
    ymax = n if k_max is None else np.where(n <= k_max, n, k_max - 1)
    batches = np.vstack([np.column_stack([n, np.zeros_like(n)]), np.column_stack([n - ymax, ymax])])
    rates = batches / np.concatenate([t, t])[:, None]
    return batches, rates


def region(bt: BatchTime, budget: int, k_max: int | None = None) -> Region:
    """The §4 region of a batch-time model, token budget and batch-size limit (None: no limit)."""
    verts_ms = theory.region_vertices(bt, budget, k_max)  # validates budget and k_max
    b = int(budget)
    k = None if k_max is None else int(k_max)
    batches, rates = _compositions(bt, b, k)
    vertex_batches: list[tuple[int, int]] = []
    for vx in verts_ms:
        gap = np.abs(rates - vx).max(axis=1)
        i = int(np.argmin(gap))  # the first (smallest) batch with this rate vector
        if gap[i] > 1e-12 * float(np.abs(verts_ms).max()):
            raise RuntimeError(f"region: vertex {vx} matches no batch composition")
        vertex_batches.append((int(batches[i, 0]), int(batches[i, 1])))
    c_index = None
    if k is not None and len(verts_ms) >= 2:
        x, y = vertex_batches[1]
        if x > 0 and y == k - 1 and vertex_batches[0][0] == 0:
            c_index = 1
    _, best = theory.max_throughput(bt, b)
    return Region(
        batch_time=bt,
        budget=b,
        k_max=k,
        vertices_tokens_per_s=tuple((float(x) * 1000.0, float(y) * 1000.0) for x, y in verts_ms),
        vertex_batches=tuple(vertex_batches),
        vertex_c_index=c_index,
        capacity_tokens_per_s=theory.capacity_tokens_per_ms(bt, b) * 1000.0,
        max_capacity_tokens_per_s=best * 1000.0,
    )


def _check_png_path(path: str | Path, field_name: str = "path") -> Path:
    """``path`` as a Path ending in .png whose folder exists, else ConfigError."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ConfigError(field_name, str(path), "must end in .png")
    if not p.parent.is_dir():
        raise ConfigError(field_name, str(path), f"folder {str(p.parent)!r} does not exist")
    return p


def _labelled(points: Mapping[str, Point] | Sequence[Point]) -> list[tuple[str, Point]]:
    """Operating points with labels ("point 1", ... when none are given)."""
    if isinstance(points, Mapping):
        return list(points.items())
    if isinstance(points, OperatingPoint):
        return [("point 1", points)]
    return [(f"point {i + 1}", p) for i, p in enumerate(points)]


def plot_region(
    reg: Region,
    path: str | Path,
    operating_points: Mapping[str, Point] | Sequence[Point] = (),
    title: str | None = None,
) -> Path:
    """Write a PNG of the region in the (prefill, decode) tokens/s plane; returns the path.

    Drawn: the region (filled), its vertices, vertex C (marked and labelled) when it exists, the
    operating points (green inside, red outside, orange on the boundary, with their load) and, for
    contrast, the scalar capacity line x + y = b / t(b) that holds without a batch-size limit.
    """
    out = _check_png_path(path)
    labelled = [(label, _token_rates(p), reg.load(p)) for label, p in _labelled(operating_points)]
    plt = pyplot()
    v = reg.vertices
    poly = np.vstack([[0.0, 0.0], [0.0, v[0, 1]], v, [v[-1, 0], 0.0]])
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.fill(poly[:, 0], poly[:, 1], color="tab:blue", alpha=0.18, label="stability region")
    ax.plot(poly[1:-1, 0], poly[1:-1, 1], color="tab:blue", lw=1.5)
    ax.plot(v[:, 0], v[:, 1], "o", color="tab:blue", ms=4, label="vertices")
    cap = reg.capacity_tokens_per_s
    ax.plot([0, cap], [cap, 0], "--", color="grey", lw=1, label=f"x + y = b/t(b) = {cap:,.0f} tokens/s")
    if reg.vertex_c is not None and reg.vertex_c_batch is not None:
        cx, cy = reg.vertex_c
        bx, by = reg.vertex_c_batch
        ax.plot([cx], [cy], "D", color="tab:purple", ms=8, label="vertex C")
        ax.annotate(
            f"C: {bx} prefill + {by} decode\n({cx:,.1f}, {cy:,.1f}) tokens/s",
            (cx, cy), textcoords="offset points", xytext=(-8, 22), ha="right", fontsize=8, color="tab:purple",
        )
    for label, rates, rho in labelled:
        if abs(rho - 1.0) <= _ON_BOUNDARY:
            colour, marker, where = "tab:orange", "o", "on the boundary"
        elif rho < 1.0:
            colour, marker, where = "tab:green", "x", "inside"
        else:
            colour, marker, where = "tab:red", "X", "outside"
        ax.plot([rates[0]], [rates[1]], marker, color=colour, ms=9, mew=2, mfc="none",
                label=f"{label}: load {rho:.3f}, {where}")
    ax.set_xlabel("prefill tokens/s  (lambda m_p)")
    ax.set_ylabel("decode tokens/s  (lambda m_d)")
    k_text = "none" if reg.k_max is None else str(reg.k_max)
    ax.set_title(title or f"stability region: b={reg.budget}, k_max={k_text}, "
                 f"{getattr(reg.batch_time, 'spec', '')}", fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.1 * max(cap, float(v[:, 1].max()), *(float(r[1]) for _, r, _ in labelled)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return save(fig, out)

"""Tests of the capacity theory: the paper's numbers (§3, §4) and properties of the bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import (
    BatchTime,
    ConstantTime,
    LinearTime,
    PiecewiseTime,
    StaircaseTime,
    TableTime,
)
from llmqueue.theory.capacity import (
    BudgetChoice,
    best_budget,
    capacity_tokens_per_ms,
    critical_rate_per_s,
    fluid_slope_tokens_per_s,
    kmax_load,
    load,
    max_throughput,
    region_vertices,
)

CODELLAMA = StaircaseTime(11.28, 35.47, 128)
MEAN_TOKENS = 129 + 112  # Fig. 1 workload
T128_MS = 46.75
VERTEX_C = np.array([29 / T128_MS, 99 / T128_MS])


# ---------------------------------------------------------------- §3 numbers


def test_paper_capacity_numbers() -> None:
    assert CODELLAMA(512) == pytest.approx(153.16, abs=1e-12)
    assert round(capacity_tokens_per_ms(CODELLAMA, 512), 3) == 3.343
    assert round(critical_rate_per_s(CODELLAMA, 512, MEAN_TOKENS), 2) == 13.87


def test_load_and_fluid_slope() -> None:
    lam_star = critical_rate_per_s(CODELLAMA, 512, MEAN_TOKENS)
    cap = capacity_tokens_per_ms(CODELLAMA, 512)
    assert load(lam_star, CODELLAMA, 512, MEAN_TOKENS) == pytest.approx(1.0)
    assert load(14.3, CODELLAMA, 512, MEAN_TOKENS) > 1.0  # Fig. 1's rate is above capacity
    assert fluid_slope_tokens_per_s(0.8 * lam_star, CODELLAMA, 512, MEAN_TOKENS) == 0.0
    slope = fluid_slope_tokens_per_s(1.2 * lam_star, CODELLAMA, 512, MEAN_TOKENS)
    assert slope == pytest.approx(0.2 * cap * 1000.0, rel=1e-12)


def test_best_budget_paper() -> None:
    choice = best_budget(CODELLAMA, 153.16)
    assert choice == BudgetChoice(512, CODELLAMA(512), 512 / CODELLAMA(512) * 1000)
    assert best_budget(CODELLAMA, 153.0).budget == 384


def test_best_budget_ties_and_errors() -> None:
    # c = 0 linear: n/t(n) is the same for all n -> smallest budget
    assert best_budget(LinearTime(0.0, 0.5), 10.0).budget == 1
    with pytest.raises(ConfigError, match="unbounded"):
        best_budget(ConstantTime(5.0), 10.0)
    with pytest.raises(ConfigError) as info:
        best_budget(CODELLAMA, 40.0)
    assert info.value.field == "max_iteration_ms"
    with pytest.raises(ConfigError):
        best_budget(CODELLAMA, 0.0)


def test_max_throughput_cases() -> None:
    # staircase, b0 divides b: the bound is b/t(b)
    assert max_throughput(CODELLAMA, 512) == (512, capacity_tokens_per_ms(CODELLAMA, 512))
    # b0 does not divide b: the last partial block costs a full step, n* = 512 < b
    n_star, best = max_throughput(CODELLAMA, 600)
    assert n_star == 512
    assert best > capacity_tokens_per_ms(CODELLAMA, 600)
    # piecewise with c < a*b0: n/t(n) peaks at b0
    steep = PiecewiseTime(1.0, 1.0, 10)
    assert max_throughput(steep, 50) == (10, 10.0)
    assert capacity_tokens_per_ms(steep, 50) == pytest.approx(50 / 41)


def test_max_throughput_for_large_budgets() -> None:
    n_star, best = max_throughput(CODELLAMA, 10**6)
    assert n_star == 999_936  # largest multiple of 128 below 10^6
    assert best == pytest.approx(n_star / CODELLAMA(n_star))


def test_max_throughput_on_table() -> None:
    bt = TableTime((16, 64, 128), (10.0, 12.0, 40.0), "")
    assert max_throughput(bt, 128) == (64, 64 / 12.0)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: capacity_tokens_per_ms(CODELLAMA, 0), "budget"),
        (lambda: capacity_tokens_per_ms(CODELLAMA, 2.5), "budget"),
        (lambda: max_throughput(CODELLAMA, True), "budget"),
        (lambda: critical_rate_per_s(CODELLAMA, 512, 0), "mean_tokens"),
        (lambda: load(-1.0, CODELLAMA, 512, 10), "rate_per_s"),
        (lambda: fluid_slope_tokens_per_s(float("nan"), CODELLAMA, 512, 10), "rate_per_s"),
        (lambda: kmax_load(1.0, 1.0, CODELLAMA, 128, 0), "k_max"),
        (lambda: kmax_load(-1.0, 1.0, CODELLAMA, 128, 5), "rate_prefill_tokens_per_ms"),
        (lambda: best_budget(CODELLAMA, 100.0, max_budget=0), "max_budget"),
    ],
)
def test_bad_arguments(call: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- hypothesis property

_consts = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
_slopes = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@st.composite
def _model_and_budget(draw: st.DrawFn) -> tuple[BatchTime, int, bool]:
    """A random closed-form model, a budget, and whether max_throughput must equal b/t(b)."""
    kind = draw(st.sampled_from(["linear", "piecewise", "staircase"]))
    c = draw(_consts)
    a = draw(_slopes)
    if c + a < 1e-3:  # the models reject batches shorter than MIN_BATCH_MS
        c = 1e-3
    if kind == "linear":
        return LinearTime(c, a), draw(st.integers(1, 3000)), True
    b0 = draw(st.integers(1, 300))
    divides = draw(st.booleans())
    budget = b0 * draw(st.integers(1, 10)) if divides else draw(st.integers(1, 3000))
    if kind == "staircase":
        return StaircaseTime(c, a, b0), budget, budget % b0 == 0
    c = max(c, 1e-3)
    # piecewise: n/t(n) rises up to b0, then rises iff c >= a*b0 (b0 | b alone is not enough)
    return PiecewiseTime(c, a, b0), budget, budget <= b0 or c >= a * b0


@given(_model_and_budget())
@example((PiecewiseTime(1.0, 1.0, 10), 50, False))  # c < a b0: n/t(n) peaks at b0 although b0 | b
@example((PiecewiseTime(1.0, 0.01, 64), 30, True))  # budget below the knee
@example((StaircaseTime(11.28, 35.47, 128), 600, False))  # b0 does not divide b: n* = 512
@example((LinearTime(1e-3, 0.0), 3000, True))  # flat: every n gives the same t
def test_max_throughput_bounds_capacity(case: tuple[BatchTime, int, bool]) -> None:
    bt, budget, equal = case
    cap = capacity_tokens_per_ms(bt, budget)
    n_star, best = max_throughput(bt, budget)
    assert budget >= n_star >= 1
    assert best >= cap
    assert best == pytest.approx(n_star / bt(n_star), rel=1e-12)
    if equal:
        assert best == pytest.approx(cap, rel=1e-9)
        # with k_max=None the region load is the scalar load
        assert kmax_load(0.3, 0.2, bt, budget, None) == pytest.approx(0.5 / cap, rel=1e-7)


# ---------------------------------------------------------------- §4 batch-size limit


def test_vertex_c_is_a_region_vertex() -> None:
    vertices = region_vertices(CODELLAMA, 128, 100)
    expected = np.array([[0.0, 100.0], [29.0, 99.0], [128.0, 0.0]]) / T128_MS
    assert np.allclose(vertices, expected, rtol=1e-12, atol=0)
    assert any(np.allclose(v, VERTEX_C, rtol=1e-12, atol=0) for v in vertices)


def test_vertex_c_is_on_the_boundary() -> None:
    lp, ld = VERTEX_C
    assert abs(kmax_load(lp, ld, CODELLAMA, 128, 100) - 1.0) < 1e-9
    assert kmax_load(0.99 * lp, 0.99 * ld, CODELLAMA, 128, 100) == pytest.approx(0.99, abs=1e-9)
    # the §4 experiment: 290 + 990 tokens every 467.5 ms is exactly vertex C's rate
    assert kmax_load(290 / 467.5, 990 / 467.5, CODELLAMA, 128, 100) == pytest.approx(1.0, abs=1e-9)
    # b=1024 keeps every b=128 composition but adds no decode rate: C stays on the boundary,
    # although the scalar load of the same request stream is below 0.8
    assert kmax_load(lp, ld, CODELLAMA, 1024, 100) == pytest.approx(1.0, abs=1e-9)
    assert load(1000 / 467.5, CODELLAMA, 1024, 290 + 990) < 0.8
    # prefill-heavy traffic does gain from the bigger budget
    assert kmax_load(3.0, 0.5, CODELLAMA, 1024, 100) < kmax_load(3.0, 0.5, CODELLAMA, 128, 100)


def test_kmax_none_reduces_to_scalar_load() -> None:
    lam_per_s = 10.0
    m_p, m_d = 129.0, 112.0
    rho = load(lam_per_s, CODELLAMA, 512, m_p + m_d)
    lp, ld = lam_per_s * m_p / 1000, lam_per_s * m_d / 1000
    assert kmax_load(lp, ld, CODELLAMA, 512, None) == pytest.approx(rho, rel=1e-9)
    # b0 not dividing b: the region uses max_n n/t(n), not b/t(b)
    _, best = max_throughput(CODELLAMA, 600)
    assert kmax_load(lp, ld, CODELLAMA, 600, None) == pytest.approx((lp + ld) / best, rel=1e-9)
    # a k_max at least b is no limit
    assert kmax_load(lp, ld, CODELLAMA, 512, 512) == pytest.approx(rho, rel=1e-9)
    assert kmax_load(0.0, 0.0, CODELLAMA, 512, 100) == 0.0


def _facet_load(vertices: np.ndarray, lam: np.ndarray) -> float:
    """Gauge of the downward-closed hull: max over its facets a.z = 1 of a.lam."""
    loads = [lam[1] / vertices[0, 1], lam[0] / vertices[-1, 0]]
    for v, w in itertools.pairwise(vertices):
        normal = np.linalg.solve(np.array([v, w]), np.ones(2))
        loads.append(float(normal @ lam))
    return max(loads)


@pytest.mark.parametrize(
    ("bt", "budget", "k_max"),
    [
        (CODELLAMA, 512, 100),
        (CODELLAMA, 1024, 30),
        (LinearTime(5.0, 0.02), 400, 64),
        (LinearTime(5.0, 0.02), 5000, 64),  # long Pareto front: qhull pruning path
        (PiecewiseTime(8.0, 0.03, 16), 700, 1),
        (TableTime((16, 64, 128, 512), (6.0, 7.0, 9.0, 20.0), ""), 600, 40),
    ],
)
def test_kmax_load_matches_facets(bt: BatchTime, budget: int, k_max: int) -> None:
    vertices = region_vertices(bt, budget, k_max)
    assert np.all(np.diff(vertices[:, 0]) > 0) and np.all(np.diff(vertices[:, 1]) < 0)
    rng = np.random.default_rng(3)
    for lam in rng.uniform(0.0, 3.0, size=(20, 2)):
        assert kmax_load(lam[0], lam[1], bt, budget, k_max) == pytest.approx(
            _facet_load(vertices, lam), rel=1e-9
        )
    # every vertex lies on the boundary
    for v in vertices:
        assert kmax_load(v[0], v[1], bt, budget, k_max) == pytest.approx(1.0, abs=1e-9)


def test_kmax_limit_shrinks_the_region() -> None:
    free = kmax_load(0.5, 2.0, CODELLAMA, 512, None)
    limited = kmax_load(0.5, 2.0, CODELLAMA, 512, 100)
    assert limited > free

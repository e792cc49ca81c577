"""The §4 batch-size-limit region (llmqueue.theory.region): geometry, loads, vertex C, simulation, plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import LinearTime, PiecewiseTime, StaircaseTime
from llmqueue.model.specs import make_workload
from llmqueue.policies.fcfs import POLICY_NAMES, SARATHI, make_policy
from llmqueue.sim.run import simulate
from llmqueue.theory import capacity as theory
from llmqueue.theory.region import OperatingPoint, Region, plot_region, region

from .helpers import examples

CODELLAMA = StaircaseTime(11.28, 35.47, 128)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

batch_times = st.one_of(
    st.builds(
        StaircaseTime,
        st.floats(1.0, 30.0),
        st.floats(1.0, 60.0),
        st.sampled_from([16, 32, 64, 128]),
    ),
    st.builds(LinearTime, st.floats(1.0, 30.0), st.floats(0.01, 1.0)),
    st.builds(
        PiecewiseTime, st.floats(5.0, 30.0), st.floats(0.01, 0.5), st.sampled_from([16, 64, 128])
    ),
)
settings_ = dict(max_examples=examples(40))


@pytest.fixture(scope="module")
def reg128() -> Region:
    return region(CODELLAMA, 128, 100)


# ------------------------------------------------------------------------------------------ geometry


@settings(**settings_)
@given(bt=batch_times, budget=st.integers(1, 600), k_max=st.one_of(st.none(), st.integers(1, 700)))
def test_vertices_form_a_convex_decreasing_chain(bt, budget: int, k_max: int | None) -> None:
    """Prefill rate increases, decode rate decreases and the slopes fall: a concave outer chain."""
    v = region(bt, budget, k_max).vertices
    assert v.shape[1] == 2 and len(v) >= 2
    assert v[0, 0] == 0.0 and v[-1, 1] == 0.0  # the chain meets both axes
    assert np.all(np.diff(v[:, 0]) > 0)
    assert np.all(np.diff(v[:, 1]) < 0)
    slopes = np.diff(v[:, 1]) / np.diff(v[:, 0])
    assert np.all(np.diff(slopes) < 1e-9 * np.abs(slopes[1:]).clip(min=1.0))


@settings(**settings_)
@given(bt=batch_times, budget=st.integers(1, 600), k_max=st.one_of(st.none(), st.integers(1, 700)))
def test_vertex_batches_are_feasible_and_give_the_vertices(bt, budget: int, k_max: int | None) -> None:
    """Each vertex is the rate vector (x, y)/t(x + y) of a batch that obeys b and k_max."""
    reg = region(bt, budget, k_max)
    for (x, y), (vx, vy) in zip(reg.vertex_batches, reg.vertices_tokens_per_s, strict=True):
        assert 0 < x + y <= budget
        if k_max is not None:
            assert y + (x > 0) <= k_max
        t = bt(x + y)
        assert vx == pytest.approx(x / t * 1000, rel=1e-12)
        assert vy == pytest.approx(y / t * 1000, rel=1e-12)


@settings(**settings_)
@given(bt=batch_times, budget=st.integers(1, 600), k_max=st.one_of(st.none(), st.integers(600, 900)))
def test_without_a_binding_k_max_the_region_is_the_triangle(bt, budget: int, k_max: int | None) -> None:
    """k_max None (or >= b): vertices (0, C) and (C, 0) with C = max n/t(n); no vertex C."""
    reg = region(bt, budget, k_max)
    _, best = theory.max_throughput(bt, budget)
    cap = best * 1000
    assert reg.vertices == pytest.approx(np.array([[0.0, cap], [cap, 0.0]]), rel=1e-12)
    assert reg.max_capacity_tokens_per_s == pytest.approx(cap, rel=1e-12)
    assert reg.vertex_c is None and reg.vertex_c_operating_point() is None
    # any direction: load is (x + y) / C
    for p in [(1.0, 2.0), (300.0, 0.0), (0.0, 5.0), (cap / 2, cap / 2)]:
        assert reg.load(p) == pytest.approx(sum(p) / cap, rel=1e-9)


@settings(**settings_)
@given(
    bt=batch_times,
    budget=st.integers(2, 400),
    k_frac=st.floats(0.01, 1.2),
    prefill=st.floats(0.0, 5000.0),
    decode=st.floats(0.0, 5000.0),
    margin=st.floats(0.0, 0.5),
)
def test_membership_agrees_with_kmax_load(
    bt, budget: int, k_frac: float, prefill: float, decode: float, margin: float
) -> None:
    """The face-by-face load of ``exit`` equals the linear program of ``theory.kmax_load``."""
    k_max = max(1, round(k_frac * budget))
    reg = region(bt, budget, k_max)
    if prefill == 0 and decode == 0:
        return
    lp = theory.kmax_load(prefill / 1000, decode / 1000, bt, budget, k_max)
    assert reg.load((prefill, decode)) == lp
    ex = reg.exit((prefill, decode))
    assert ex.load == pytest.approx(lp, rel=1e-7)
    assert reg.contains((prefill, decode), margin) == (lp <= 1 - margin)
    # the crossing is on the boundary: load 1, on the ray
    assert reg.load(ex.point_tokens_per_s) == pytest.approx(1.0, rel=1e-7)
    assert ex.point_tokens_per_s[0] * decode == pytest.approx(ex.point_tokens_per_s[1] * prefill, rel=1e-9,
                                                               abs=1e-9)
    assert ex.batch == reg.vertex_batches[ex.vertex]


def test_exit_faces_of_the_b128_region(reg128: Region) -> None:
    """b = 128, k_max = 100: decode-heavy rays leave through the (0,100)-(29,99) face, others through
    the full-budget face (29,99)-(128,0); pure prefill leaves at the (128, 0) vertex."""
    assert reg128.vertex_batches == ((0, 100), (29, 99), (128, 0))
    decode_heavy = reg128.exit((10.0, 2000.0))
    assert decode_heavy.face == (0, 1) and not decode_heavy.at_vertex
    balanced = reg128.exit((1000.0, 1000.0))
    assert balanced.face == (1, 2) and balanced.vertex == 1 and not balanced.at_vertex
    assert balanced.load == pytest.approx(2000.0 / reg128.capacity_tokens_per_s, rel=1e-12)
    prefill = reg128.exit((500.0, 0.0))
    assert prefill.at_vertex and prefill.batch == (128, 0)


# ------------------------------------------------------------------------------------------ vertex C


def test_vertex_c_of_the_paper(reg128: Region) -> None:
    """b = 128, k_max = 100: C = (29, 99)/46.75 tokens/ms; 290 + 990 tokens at 2.139037 req/s."""
    assert reg128.vertex_c_batch == (29, 99)
    assert reg128.vertex_c == pytest.approx((29 / 46.75 * 1000, 99 / 46.75 * 1000), rel=1e-12)
    op = reg128.vertex_c_operating_point()
    assert op is not None
    assert (op.mean_prefill_tokens, op.mean_decode_tokens) == (290.0, 990.0)
    assert op.rate_per_s == pytest.approx(1000 / 467.5, rel=1e-12)
    assert round(op.rate_per_s, 6) == 2.139037
    assert reg128.load(op) == pytest.approx(1.0, abs=1e-9)
    ex = reg128.exit(op)
    assert ex.at_vertex and ex.vertex == reg128.vertex_c_index and ex.batch == (29, 99)
    assert not reg128.contains(op, margin=0.01)
    assert reg128.contains(op.scaled(0.95)) and not reg128.contains(op.scaled(1.05))


@pytest.mark.parametrize("budget", [256, 1024])
def test_vertex_c_with_bigger_budgets(budget: int) -> None:
    """Sarathi-1024's region has the same vertex C: the paper's point is on its boundary too."""
    reg = region(CODELLAMA, budget, 100)
    assert reg.vertex_c_batch == (29, 99)
    op = reg.vertex_c_operating_point(multiple=3)
    assert op is not None and (op.mean_prefill_tokens, op.mean_decode_tokens) == (87.0, 297.0)
    assert reg.load(op) == pytest.approx(1.0, abs=1e-9)


def test_no_vertex_c_when_the_limit_binds_only_pure_decode() -> None:
    """k_max = b: pure-decode batches of b tokens are allowed, the region is the triangle."""
    assert region(CODELLAMA, 128, 128).vertex_c is None
    assert region(CODELLAMA, 128, None).vertex_c is None


# ------------------------------------------------------------------------------------------ simulation


@pytest.mark.parametrize("arrival", ["deterministic", "poisson"])
def test_just_inside_vertex_c_sarathi_keeps_up(reg128: Region, arrival: str) -> None:
    """Load 0.95 along the vertex-C ray: Sarathi with the region's b and k_max is not unstable."""
    op = reg128.vertex_c_operating_point()
    assert op is not None
    rate = reg128.rate_at_load(op, 0.95)
    assert reg128.load(op.scaled(rate / op.rate_per_s)) == pytest.approx(0.95, rel=1e-9)
    workload = make_workload(arrival, "290", "990", rate)
    result = simulate(workload, SARATHI, CODELLAMA, 128, k_max=100, seed=1, max_requests=20_000,
                      keep_requests=False)
    assert result.theory.kmax_load == pytest.approx(0.95, rel=1e-9)
    assert result.observed.verdict != "unstable"
    assert result.metrics.completed == 20_000


@pytest.mark.parametrize("arrival", ["deterministic", "poisson"])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_just_outside_vertex_c_no_policy_keeps_up(reg128: Region, arrival: str, name: str) -> None:
    """Load 1.05 along the vertex-C ray: every shipped policy with b = 128, k_max = 100 falls behind."""
    op = reg128.vertex_c_operating_point()
    assert op is not None
    rate = reg128.rate_at_load(op, 1.05)
    workload = make_workload(arrival, "290", "990", rate)
    result = simulate(workload, make_policy(name), CODELLAMA, 128, k_max=100, seed=1,
                      max_requests=20_000, keep_requests=False)
    m = result.metrics
    falls_behind = m.incomplete > 0 and m.request_throughput < 0.99 * rate
    assert result.observed.verdict == "unstable" or falls_behind
    assert result.predicted.verdict == "unstable"


# ------------------------------------------------------------------------------------------ plot, input


def test_plot_region_writes_a_png(reg128: Region, tmp_path: Path) -> None:
    op = reg128.vertex_c_operating_point()
    assert op is not None
    out = plot_region(
        reg128, tmp_path / "region.png",
        operating_points={"0.95": op.scaled(0.95), "1.05": op.scaled(1.05), "tokens": (100.0, 100.0)},
        title="b=128, k_max=100",
    )
    assert out == tmp_path / "region.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    triangle = plot_region(region(CODELLAMA, 512), tmp_path / "tri.PNG", [(100.0, 100.0)])
    assert triangle.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda r: r.load((-1.0, 2.0)), "prefill_tokens_per_s"),
        (lambda r: r.load((1.0, float("nan"))), "decode_tokens_per_s"),
        (lambda r: r.load((1.0, 2.0, 3.0)), "point"),
        (lambda r: OperatingPoint(-2.0, 10, 10), "rate_per_s"),
        (lambda r: OperatingPoint(2.0, -10, 10), "mean_prefill_tokens"),
        (lambda r: OperatingPoint(2.0, 10, float("inf")), "mean_decode_tokens"),
        (lambda r: r.contains((1.0, 1.0), margin=1.0), "margin"),
        (lambda r: r.contains((1.0, 1.0), margin=-0.1), "margin"),
        (lambda r: r.exit((0.0, 0.0)), "point"),
        (lambda r: r.rate_at_load((1.0, 1.0), 0.9), "point"),
        (lambda r: r.rate_at_load(OperatingPoint(1.0, 1, 1), -0.9), "load"),
        (lambda r: r.vertex_c_operating_point(0), "multiple"),
        (lambda r: plot_region(r, "region.svg"), "path"),
        (lambda r: plot_region(r, "/nonexistent-dir/region.png"), "path"),
        (lambda r: region(CODELLAMA, 0, 10), "budget"),
        (lambda r: region(CODELLAMA, 128, 0), "k_max"),
    ],
)
def test_bad_input_names_the_field(reg128: Region, call, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        call(reg128)
    assert err.value.field == field

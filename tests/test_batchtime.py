"""Tests of the batch-time models t(n), their spec strings, the table model and the fits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import (
    BatchTime,
    ConstantTime,
    LinearTime,
    PiecewiseTime,
    StaircaseTime,
    TableTime,
    fit_piecewise,
    fit_staircase,
    parse_batch_time,
)

DATA = Path(__file__).parent / "data"
POINTS_CSV = DATA / "batchtime_points.csv"
H200_CSV = Path("/work/shared/data/gpu/batch_times_h200.csv")

MODELS: list[BatchTime] = [
    ConstantTime(1.0),
    LinearTime(2.5, 0.01),
    PiecewiseTime(21.81, 0.1166, 170),
    StaircaseTime(11.28, 35.47, 128),
    TableTime((16, 64, 128, 256), (11.0, 20.0, 30.0, 50.0), ""),
]


def _assert_config_error(err: ConfigError, field: str = "batch-time") -> None:
    """The error names its field and is one line."""
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert "\n" not in str(err)


# ---------------------------------------------------------------- closed-form models


def test_paper_staircase_values() -> None:
    bt = StaircaseTime(11.28, 35.47, 128)
    assert bt(512) == pytest.approx(153.16, abs=1e-12)
    assert bt(128) == pytest.approx(46.75, abs=1e-12)
    assert bt(129) == pytest.approx(11.28 + 2 * 35.47)
    assert bt(1) == bt(128)


def test_formulas() -> None:
    assert ConstantTime(3)(10_000) == 3.0
    assert LinearTime(1.0, 0.5)(4) == 3.0
    pw = PiecewiseTime(2.0, 0.25, 8)
    assert pw(1) == pw(8) == 2.0
    assert pw(12) == 3.0


@pytest.mark.parametrize("bt", MODELS, ids=lambda m: type(m).__name__)
def test_times_ms_matches_scalar(bt: BatchTime) -> None:
    n = np.arange(1, 700)
    vec = bt.times_ms(n)
    assert vec.shape == n.shape
    assert vec.dtype == np.float64
    assert np.array_equal(vec, np.array([bt(int(k)) for k in n]))


@pytest.mark.parametrize("bt", MODELS[:4], ids=lambda m: type(m).__name__)
def test_spec_round_trip(bt: BatchTime) -> None:
    again = parse_batch_time(bt.spec)
    assert again == bt
    assert again.spec == bt.spec
    assert isinstance(again, BatchTime)


def test_spec_text() -> None:
    assert ConstantTime(1).spec == "constant:c=1"
    assert StaircaseTime(11.28, 35.47, 128).spec == "staircase:c=11.28,a=35.47,b0=128"
    assert parse_batch_time(" staircase : b0=128, a=35.47 ,c=11.28") == StaircaseTime(
        11.28, 35.47, 128
    )
    assert parse_batch_time("linear:c=0.1,a=1e-3").spec == "linear:c=0.1,a=0.001"


def test_models_are_frozen_and_hashable() -> None:
    bt = StaircaseTime(11.28, 35.47, 128)
    with pytest.raises(AttributeError):
        bt.c = 1.0  # type: ignore[misc]
    assert hash(bt) == hash(StaircaseTime(11.28, 35.47, 128.0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConstantTime(0),
        lambda: ConstantTime(float("nan")),
        lambda: LinearTime(0, 0),
        lambda: LinearTime(1, -0.1),
        lambda: LinearTime(-1, 2),
        lambda: PiecewiseTime(0, 1, 4),
        lambda: PiecewiseTime(1, 1, 0),
        lambda: StaircaseTime(1, 1, 2.5),
        lambda: StaircaseTime(0, 0, 128),
        lambda: StaircaseTime(1, 1, True),
        lambda: LinearTime("x", 1),
    ],
)
def test_bad_constructor_values(make: object) -> None:
    with pytest.raises(ConfigError) as info:
        make()  # type: ignore[operator]
    _assert_config_error(info.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "KIND"),
        ("constant", "KIND"),
        ("bogus:c=1", "unknown kind"),
        ("constant:", "missing key 'c'"),
        ("linear:c=1", "missing key 'a'"),
        ("constant:c=1,a=2", "unknown key 'a'"),
        ("constant:c=1,c=2", "duplicate key 'c'"),
        ("constant:c", "key=value"),
        ("linear:c=x,a=1", "c must be a number"),
        ("constant:c=inf", "finite"),
        ("constant:c=-1", "c must be at least"),
        ("linear:c=0,a=0", "t(1) must be at least"),
        ("staircase:c=1,a=1,b0=0", "b0 must be an integer"),
        ("staircase:c=1,a=1,b0=2.5", "b0 must be an integer"),
        ("table:", "needs a CSV path"),
        ("table:/no/such/file.csv", "not found"),
        (f"table:{POINTS_CSV},colour=red", "unknown column 'colour'"),
        (f"table:{POINTS_CSV},gpu=z", "no table rows"),
        (f"table:{POINTS_CSV},gpu=a,gpu=b", "duplicate key"),
        (f"table:{DATA / 'batchtime_bad_cell.csv'}",
         "line 3 column 'median_ms' is not a finite number: 'fast'"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_batch_time(spec)
    _assert_config_error(info.value)
    assert needle in info.value.problem
    assert info.value.value == spec


def test_non_string_spec() -> None:
    with pytest.raises(ConfigError) as info:
        parse_batch_time(3)  # type: ignore[arg-type]
    _assert_config_error(info.value)


# ---------------------------------------------------------------- table model


def test_table_exact_at_points_and_linear_between() -> None:
    ns, ts = (16, 64, 128, 256), (11.0, 20.0, 30.0, 50.0)
    bt = TableTime(ns, ts, "")
    for n, t in zip(ns, ts, strict=True):
        assert bt(n) == t
    assert bt(40) == pytest.approx(11.0 + (20.0 - 11.0) * 24 / 48)
    assert bt(96) == pytest.approx(25.0)
    assert bt(192) == pytest.approx(40.0)
    assert np.array_equal(bt.times_ms(np.array(ns)), np.array(ts))


def test_table_extrapolates_with_end_segments_and_clamps() -> None:
    bt = TableTime((16, 64, 128, 256), (11.0, 20.0, 30.0, 50.0), "")
    assert bt(512) == pytest.approx(50.0 + 256 * 20.0 / 128)
    assert bt(1) == pytest.approx(11.0 - 15 * 9.0 / 48)
    steep = TableTime((100, 200), (1.0, 10.0), "")
    assert steep(1) == pytest.approx(1e-3)  # clamped at 1e-3 of the smallest time
    assert steep(1) > 0
    assert np.all(steep.times_ms(np.arange(1, 300)) > 0)


@pytest.mark.parametrize(
    ("ns", "ts"),
    [
        ((16, 16), (1.0, 2.0)),
        ((32, 16), (1.0, 2.0)),
        ((16, 32), (1.0, 0.0)),
        ((16, 32), (1.0,)),
        ((16,), (1.0,)),
        ((0, 16), (1.0, 2.0)),
    ],
)
def test_table_validation(ns: tuple[int, ...], ts: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        TableTime(ns, ts, "")
    _assert_config_error(info.value)


def test_table_from_csv_filters_and_median() -> None:
    bt = parse_batch_time(f"table:{POINTS_CSV},gpu=a")
    assert isinstance(bt, TableTime)
    assert bt.n_tokens == (16, 64, 128, 256)
    assert bt.time_ms == (11.0, 20.0, 30.0, 50.0)  # 16 is the median of 10, 12, 11
    assert parse_batch_time(bt.spec) == bt
    pooled = parse_batch_time(f"table:{POINTS_CSV}")
    assert pooled(128) == pytest.approx((30.0 + 99.0) / 2)


def test_table_on_h200_measurements() -> None:
    spec = f"table:{H200_CSV},model=codellama-34b,mode=graph,composition=decode"
    bt = parse_batch_time(spec)
    assert isinstance(bt, TableTime)
    assert bt.n_tokens[0] == 16 and bt.n_tokens[-1] == 4096
    assert len(bt.n_tokens) == 16
    assert bt(512) == pytest.approx(76.1304)
    assert bt(448) == pytest.approx((63.1664 + 76.1304) / 2)
    # canonical spec: filters sorted by column; parses back to an equal model
    assert bt.spec.endswith(",composition=decode,mode=graph,model=codellama-34b")
    assert parse_batch_time(bt.spec) == bt
    both = parse_batch_time(f"table:{H200_CSV},model=llama3-8b")  # graph and eager pooled
    assert len(both.n_tokens) == 16


# ---------------------------------------------------------------- fits


def test_fit_staircase_recovers_constants() -> None:
    n = np.arange(1, 2049, 7)
    t = StaircaseTime(11.28, 35.47, 128).times_ms(n)
    model, r2 = fit_staircase(n, t, 128)
    assert model.c == pytest.approx(11.28, rel=1e-9)
    assert model.a == pytest.approx(35.47, rel=1e-9)
    assert model.b0 == 128
    assert r2 == pytest.approx(1.0)


def test_fit_piecewise_recovers_constants() -> None:
    n = np.arange(16, 4097, 16)
    truth = PiecewiseTime(21.81, 0.1166, 170)
    t = truth.times_ms(n)
    model, r2 = fit_piecewise(n, t, 170)
    assert (model.c, model.a) == pytest.approx((21.81, 0.1166), rel=1e-9)
    assert r2 == pytest.approx(1.0)
    found, r2_scan = fit_piecewise(n, t)
    assert found.b0 == 170
    assert (found.c, found.a) == pytest.approx((21.81, 0.1166), rel=1e-9)
    assert r2_scan == pytest.approx(1.0)


def test_fit_piecewise_with_noise() -> None:
    rng = np.random.default_rng(7)
    n = np.repeat(np.arange(16, 2049, 32), 3)
    t = PiecewiseTime(8.0, 0.03, 256).times_ms(n) * (1 + 0.01 * rng.standard_normal(n.size))
    model, r2 = fit_piecewise(n, t)
    assert 0.98 < r2 < 1.0
    assert model.a == pytest.approx(0.03, rel=0.05)
    assert abs(model.b0 - 256) < 64


def test_fit_bad_input() -> None:
    with pytest.raises(ConfigError):
        fit_staircase([1], [1.0], 128)
    with pytest.raises(ConfigError):
        fit_piecewise([1, 2], [1.0, -1.0])
    with pytest.raises(ConfigError):
        fit_staircase([1, 2], [1.0, 2.0], 0)

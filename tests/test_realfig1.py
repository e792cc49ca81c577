"""llmqueue against the real-engine Fig. 1 runs on one H200 (shared/data/gpu/engine_fig1).

The fit reproduces the calibration table; the quantities computed from the logs equal the run's
own summary.csv (so the metric definitions match); the simulated runs are read the way the engine
records them; the predicted verdicts; the CLI writes the report.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest

from llmqueue.errors import ConfigError
from llmqueue.paper import realfig1 as rf
from llmqueue.policies.fcfs import SARATHI
from llmqueue.sim.run import simulate

from .helpers import SHARED_DATA, run_cli

ENGINE = SHARED_DATA / "gpu" / "engine_fig1"
FOLDERS = {"run1": ENGINE, "run2": ENGINE / "run2_load095"}
RUN = {r.key: r for r in rf.RUNS}


@pytest.fixture(scope="module")
def comp() -> rf.Comparison:
    return rf.compare_real(SHARED_DATA, what_if=False, replicates=0)


def _summary(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "summary.csv").open(encoding="utf-8") as fh:
        return {row["policy"]: row for row in csv.DictReader(fh)}


@pytest.mark.parametrize("key", ["run1", "run2"])
def test_fit_reproduces_the_calibration_rows(key: str) -> None:
    fit = rf.fit_calibration(FOLDERS[key] / "calibration.csv")
    m = fit.model
    assert len(fit.measured_ms) == 13
    assert fit.r_squared > 0.98
    assert fit.max_rel_error < 0.08  # stated in the report: 6.9 % (run 1), 5.1 % (run 2)
    rel = np.abs(np.array(fit.fitted_ms) / np.array(fit.measured_ms) - 1)
    assert rel.max() == pytest.approx(fit.max_rel_error)
    # the full mixed batch that defines lambda* is reproduced to 1 %
    assert rel[fit.compositions.index("mixed_full_sarathi")] < 0.01
    assert min(m.c, m.prefill, m.decode, m.chunk) >= 0 and m.kv == 0 and m.logit == 0
    assert m.chunk > 0 and m.decode > m.prefill  # a chunk costs; a decode token more than a prompt token
    assert m.floor in fit.measured_ms  # the floor is one of the measured times (scanned)


def test_run1_floor_is_the_calibration_floor_not_the_in_run_one() -> None:
    fit = rf.fit_calibration(ENGINE / "calibration.csv")
    small = [t for name, t in zip(fit.compositions, fit.measured_ms, strict=True)
             if name in {"decode_only_1", "decode_only_3", "decode_only_16", "decode_only_64"}]
    assert min(small) <= fit.model.floor <= max(small) + 0.2  # about 13 ms, not the README's 9.6 ms
    assert fit.model.floor > rf.HOST_FLOOR_MS + 3


def test_fit_rejects_a_bad_table(tmp_path: Path) -> None:
    text = (ENGINE / "calibration.csv").read_text(encoding="utf-8")
    bad = tmp_path / "calibration.csv"
    bad.write_text(text.replace("24.552", "fast"), encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 column 'median_ms' is not a finite number: 'fast'"):
        rf.fit_calibration(bad)
    bad.write_text(text.replace("n_prefill_chunks", "chunks"), encoding="utf-8")
    with pytest.raises(ConfigError, match="missing column 'n_prefill_chunks'"):
        rf.fit_calibration(bad)
    with pytest.raises(ConfigError, match=r"no calibration\.csv there"):
        rf.fit_calibration(tmp_path / "none" / "calibration.csv")


COLUMNS = {  # summary.csv column -> RunQuantities attribute
    "completed": "completed", "thr_req_s_2nd_half": "thr_req_s_2nd_half", "ttft_mean_ms": "ttft_mean_ms",
    "ttft_p99_ms": "ttft_p99_ms", "latency_mean_ms": "latency_mean_ms",
    "backlog_at_arrival_end": "backlog_at_arrival_end", "final_backlog_tokens": "final_backlog_tokens",
    "backlog_slope_tok_s": "backlog_slope_tok_s", "iterations": "iterations", "mean_iter_ms": "mean_iter_ms",
    "mean_tokens_per_iter": "mean_tokens_per_iter", "arrivals": "arrivals",
}


@pytest.mark.parametrize("key", ["run1", "run2"])
def test_measured_quantities_equal_the_runs_summary(key: str, comp: rf.Comparison) -> None:
    summary = _summary(FOLDERS[key])
    rc = comp.run(key)
    assert set(rc.policies) == set(summary)
    for policy, pc in rc.policies.items():
        for column, attr in COLUMNS.items():
            given = float(summary[policy][column])
            # summary.csv is rounded to 3 decimals
            assert getattr(pc.measured, attr) == pytest.approx(given, rel=1e-4, abs=1e-3), (policy, column)
        assert pc.summary_deviation[0] < 1e-3
    assert rc.lambda_req_s == float(next(iter(summary.values()))["lambda_req_s"])


def test_backlog_reconstruction_matches_the_logged_backlog() -> None:
    """Arrivals up to the start, less the tokens of earlier iterations: the engine's own backlog,
    except where an arrival and an iteration start share the log's 1 us tick."""
    for folder in FOLDERS.values():
        for log in rf.read_logs(folder).values():
            r, it = log.requests, log.iterations
            mine = rf.backlog_at_starts(r["arrival_ms"], r["prefill_tokens"] + r["decode_tokens"],
                                        it["start_ms"], it["n_tokens"])
            off = np.flatnonzero(mine != it["backlog_tokens"])
            assert off.size <= 1
            for i in off:
                assert mine[i] - it["backlog_tokens"][i] == 241
                assert np.any(r["arrival_ms"] == it["start_ms"][i])


def test_simulated_run_is_read_as_the_engine_records_it(comp: rf.Comparison) -> None:
    """First token, finish and the trend test from the batches equal the engine's own records."""
    run = RUN["run1"]
    requests = rf._replay(rf.read_logs(ENGINE)["sarathi"])
    result = simulate(requests, SARATHI, comp.run("run1").fit.model, rf.BUDGET, duration_s=45.0,
                         drain_s=5.0, keep_batches=True, keep_requests=True)
    q = rf.simulated_quantities(result, requests, run)
    assert result.requests is not None
    records = {r.id: r for r in result.requests}
    assert q.completed == sum(math.isfinite(r.finish_ms) for r in records.values()) == 3307
    ttft = [r.first_token_ms - r.arrival_ms for r in records.values()]
    assert q.ttft_mean_ms == pytest.approx(np.mean(ttft), rel=1e-12)
    assert q.latency_mean_ms == pytest.approx(result.metrics.latency["mean_e2el_ms"], rel=1e-9)
    assert q.trend.slope_tokens_per_s == pytest.approx(result.observed.slope_tokens_per_s, rel=1e-6, abs=1e-6)
    assert q.trend.verdict == result.observed.verdict
    assert q.completed == comp.run("run1").policies["sarathi"].predicted.completed


def test_simulation_replays_the_run(comp: rf.Comparison) -> None:
    for rc in comp.runs:
        for pc in rc.policies.values():
            assert pc.predicted.arrivals == pc.measured.arrivals == rc.arrivals
            assert pc.result.batches is not None
            assert max(b.start_ms for b in pc.result.batches) < rc.run.stop_s * 1000.0
            assert pc.result.budget == rf.BUDGET and pc.result.policy == pc.policy


def test_predicted_verdicts(comp: rf.Comparison) -> None:
    r1, r2 = comp.run("run1").policies, comp.run("run2").policies
    assert r1["fastertransformer"].result.observed.verdict == "unstable"
    assert r1["sarathi"].result.observed.verdict == "stable"
    for name in ("sarathi", "orca"):  # the theorem's verdict, and the run keeps up
        pc = r1[name]
        assert pc.result.predicted.verdict == "stable"
        assert pc.result.observed.verdict != "unstable"
        assert pc.predicted.completed == pc.predicted.arrivals and pc.predicted.final_backlog_tokens == 0
        assert pc.predicted.thr_req_s_2nd_half == pytest.approx(comp.run("run1").lambda_req_s, rel=0.02)
    assert r2["vllm"].result.observed.verdict == "unstable"
    assert r2["vllm"].verdict_agreement("unstable") == "yes"
    # FasterTransformer's backlog grows at about the offered token rate, measured and predicted
    ft = r1["fastertransformer"]
    assert ft.predicted.backlog_slope_tok_s == pytest.approx(ft.measured.backlog_slope_tok_s, rel=0.05)


def test_verdict_agreement_levels(comp: rf.Comparison) -> None:
    pc = comp.run("run1").policies["sarathi"]  # llmqueue: stable
    assert pc.verdict_agreement("stable") == "yes"
    assert pc.verdict_agreement("inconclusive") == "partly"
    assert pc.verdict_agreement("unstable") == "no"


def test_cli_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str], comp: rf.Comparison,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--quick compares the replays alone: the comparison the module's fixture made (same data, no
    what-if runs, no fresh streams), which the CLI gets instead of computing it a second time."""
    calls = []

    def same_comparison(data_dir: str | Path, *, what_if: bool = True, replicates: int = 8) -> rf.Comparison:
        calls.append((Path(data_dir), what_if, replicates))
        return comp

    monkeypatch.setattr(rf, "compare_real", same_comparison)
    code, out, err = run_cli(capsys, "reproduce", "fig1", "--real", "--quick", "--out", str(tmp_path),
                             "--data-dir", str(SHARED_DATA))
    assert calls == [(SHARED_DATA, False, 0)]
    assert code == 0, err  # 0 although some quantities disagree: the comparison ran
    assert "agrees" in out and "fig1_real.md" in out
    text = (tmp_path / "fig1_real.md").read_text(encoding="utf-8")
    assert "| quantity | measured on H200 | predicted by llmqueue | error | agrees |" in text
    # the run-1 fit in words, 4 significant digits of nnls coefficients: compared as numbers
    words = re.search(r"max\(([\d.]+), ([\d.]+) \+ ([\d.]+) P \+ ([\d.]+) D \+ ([\d.]+) C\) ms", text)
    assert words is not None
    printed = [float(v) for v in words.groups()]
    assert printed == pytest.approx([13.32, 8.036, 0.01158, 0.03104, 1.986], rel=5e-4)
    m = comp.run("run1").fit.model
    assert printed == pytest.approx([m.floor, m.c, m.prefill, m.decode, m.chunk], rel=5e-4)
    assert "| thr req/s (2nd half) | 73.60 |" in text  # measured Sarathi, as in summary.csv
    for name in ("fig1_real_run1.png", "fig1_real_run2.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "reproduce", "example", "--real", "--out", str(tmp_path))
    assert code == 2 and "real: --real is for fig1 only (got 'example')" in err
    code, _, err = run_cli(capsys, "reproduce", "fig1", "--real", "--out", str(tmp_path),
                           "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("llmqueue: error: data-dir:") and err.count("\n") == 1


def test_replicates_must_be_a_count() -> None:
    with pytest.raises(ConfigError, match="replicates"):
        rf.compare_real(SHARED_DATA, replicates=-1)


def test_summary_errors_name_the_policys_line(tmp_path: Path, comp: rf.Comparison) -> None:
    """A bad number in summary.csv is reported at its own line (the header is line 1)."""
    rows = list(_summary(ENGINE).values())
    rows[2]["thr_req_s_2nd_half"] = "n/a"
    path = tmp_path / "summary.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    measured = comp.run("run1").policies[rows[2]["policy"]].measured
    with pytest.raises(ConfigError) as err:
        rf.summary_deviation(tmp_path, rows[2]["policy"], measured)
    assert err.value.field == "summary.csv" and "line 4 column 'thr_req_s_2nd_half'" in str(err.value)


def test_iteration_times_refuse_terms_the_log_cannot_feed() -> None:
    """iterations.csv has no KV-token or logit-row counts: a model with those terms is refused,
    one without them times every logged iteration."""
    from llmqueue.model.batchtime import CompositionTime

    ones = np.ones(3)
    plain = CompositionTime(c=1.0, prefill=0.5, decode=0.25, chunk=2.0, floor=3.0)
    assert rf.model_times_ms(plain, ones * 4, ones * 8, ones).tolist() == [7.0, 7.0, 7.0]
    for extra in ({"kv": 0.01}, {"logit": 0.1}):
        with pytest.raises(ConfigError):
            rf.model_times_ms(CompositionTime(c=1.0, prefill=0.5, decode=0.25, **extra), ones, ones, ones)

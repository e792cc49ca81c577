"""Outputs that never mislead: the audit overrides a false work-conservation claim, a trace window
reports what was simulated, replicated runs of a deterministic workload are not called independent,
searches are bounded, and compare shows every run's notes in a table that fits a terminal.
"""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from llmqueue.cli.run import _compare_table
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import ConstantTime, StaircaseTime
from llmqueue.model.specs import make_workload
from llmqueue.policies.fcfs import SARATHI, VLLM, VLLM_CHUNKED
from llmqueue.sim.run import simulate
from llmqueue.studies.slo import is_deterministic, max_rate_under_slo, max_steps

from .helpers import SHARED_DATA, run_cli

AZURE = SHARED_DATA / "traces" / "azure_conv_2023.csv"
T = StaircaseTime(c=11.28, a=35.47, b0=128)


# -- the work-conservation audit overrides a false declaration ------------------------------------


def _one_token(view):
    """Serves one prompt token per batch: far from work-conserving, whatever it claims."""
    for r in view.prefilling:
        return {r.id: 1}
    return {r.id: 1 for r in list(view.decoding)[:1]}


def test_a_false_work_conserving_claim_is_overridden_loudly() -> None:
    _one_token.work_conserving = True  # type: ignore[attr-defined]
    try:
        w = make_workload("poisson", "20", "5", rate_per_s=0.5)
        result = simulate(w, _one_token, ConstantTime(1.0), 64, max_requests=40)
    finally:
        del _one_token.work_conserving  # type: ignore[attr-defined]
    assert result.theory.load < 1 and result.metrics.wc_violations > 0
    assert result.predicted.verdict != "stable"
    assert any(n.startswith("WARNING") and "declares work_conserving" in n for n in result.notes)
    honest = simulate(w, SARATHI, ConstantTime(1.0), 64, max_requests=40)
    assert honest.predicted.verdict == "stable" and not any("WARNING" in n for n in honest.notes)


# -- a trace window reports what was simulated ------------------------------------------------------


def test_a_trace_prefix_reports_its_own_rate_and_sizes() -> None:
    """The first 400 requests of the Azure trace arrive slower than the whole hour, with smaller
    prompts: the run's rate, load and theory are theirs, and the window is flagged."""
    w = make_workload(f"trace:{AZURE}", None, None, None)
    n = 400
    result = simulate(w, SARATHI, T, 4096, max_requests=n, keep_requests=True)
    arrivals = [r.arrival_ms for r in result.requests]
    assert result.rate == pytest.approx((n - 1) / ((arrivals[-1] - arrivals[0]) / 1000.0), rel=1e-12)
    assert not math.isclose(result.rate, w.rate_per_s, rel_tol=0.05)
    mean_tokens = sum(r.prefill_tokens + r.decode_tokens for r in result.requests) / n
    assert result.theory.load == pytest.approx(
        result.rate * mean_tokens / result.theory.capacity_tokens_per_s, rel=1e-9)
    note = next(x for x in result.notes if x.startswith(f"simulated the first {n}"))
    assert "not representative" in note


def test_the_whole_trace_keeps_the_traces_rate_without_a_note() -> None:
    w = make_workload(f"trace:{AZURE},end=120", None, None, None)
    result = simulate(w, SARATHI, T, 4096)
    assert result.rate == pytest.approx(w.rate_per_s, rel=1e-12)
    assert not any(x.startswith("simulated the first") for x in result.notes)


# -- deterministic replicates, bounded searches ---------------------------------------------------


def test_a_deterministic_workload_is_one_run_not_independent_seeds() -> None:
    specs = ("deterministic", "129", "112")
    assert is_deterministic(make_workload(*specs, 5.0))
    assert not is_deterministic(make_workload("poisson", "129", "112", 5.0))
    assert is_deterministic(make_workload(f"trace:{AZURE}", None, None, None))
    cap = max_rate_under_slo(specs, SARATHI, T, 512, {"p99_ttft_ms": 800.0}, seeds=(0, 1, 2),
                             max_requests=300, tolerance=0.1)
    assert cap.runs == len(cap.points)  # one run per evaluated rate, not three identical ones
    assert "ONE run" in cap.statement and "independent" not in cap.statement
    random_cap = max_rate_under_slo(("poisson", "129", "112"), SARATHI, T, 512, {"p99_ttft_ms": 800.0},
                                    seeds=(0, 1), max_requests=300, tolerance=0.1)
    assert random_cap.runs == 2 * len(random_cap.points) and "independent runs" in random_cap.statement


def test_the_slo_bisection_is_bounded_by_its_tolerance() -> None:
    cap = max_rate_under_slo(("poisson", "129", "112"), SARATHI, T, 512, {"p99_ttft_ms": 5000.0},
                             seeds=(0, 1), max_requests=200, tolerance=0.05)
    assert len(cap.points) <= max_steps(0.05) == 7
    with pytest.raises(ConfigError, match="tolerance"):
        max_rate_under_slo(("poisson", "129", "112"), SARATHI, T, 512, {"p99_ttft_ms": 5000.0},
                           tolerance=1e-17)


def test_capacity_slo_on_a_replay_says_what_is_replicated(capsys) -> None:
    code, out, err = run_cli(capsys, "capacity", "--slo", "p99_ttft_ms=5000", "--arrival",
                             f"trace:{AZURE},end=60", "--budget", "4096", "--tolerance", "0.2",
                             "--batch-time", "piecewise:c=22.64,a=0.117,b0=81")
    assert code == 0, err
    assert "1 run (the workload draws nothing from the seed)" in out and "ONE run" in out


# -- compare ------------------------------------------------------------------------------------


def test_compare_shows_every_runs_notes_and_same_schedules(capsys) -> None:
    code, out, err = run_cli(
        capsys, "compare", "--policies", "vllm,sarathi,vllm-chunked", "--arrival",
        f"trace:{AZURE}", "--requests", "300", "--budget", "1024", "--plot", "",
        "--batch-time", "piecewise:c=22.64,a=0.117,b0=81",
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert "note [vllm]:" in text and "never chunks prompts" in text  # prompts over the budget
    assert "sarathi and vllm-chunked ran the same schedule here" in text
    assert "vllm is vanilla vLLM as of 2023" in text
    assert "note: simulated the first 300" in text  # shared by all runs: printed once
    assert text.count("simulated the first 300") == 1


def test_the_compare_table_fits_a_120_column_terminal() -> None:
    w = make_workload("poisson", "129", "112", rate_per_s=18.0)
    results = [simulate(w, p, T, 512, max_requests=2000, keep_requests=False)
               for p in (VLLM, SARATHI, VLLM_CHUNKED, VLLM, SARATHI, VLLM_CHUNKED)]
    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(_compare_table(results))
    rendered = console.export_text()
    assert "…" not in rendered and max(len(line) for line in rendered.splitlines()) <= 120


# -- progress on long work ----------------------------------------------------------------------


def test_reproduce_says_what_it_is_doing(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "reproduce", "example", "--quick", "--out", str(tmp_path), "--progress")
    assert code == 0, err
    assert "reproducing example (1 of 1" in err


def test_warmup_compiles_or_says_why_not(capsys) -> None:
    code, out, err = run_cli(capsys, "warmup")
    assert code == 0, err
    assert "compiled event loops ready in" in out or "numba is not installed" in out


def test_json_output_carries_the_notes(capsys) -> None:
    code, out, err = run_cli(capsys, "simulate", "--arrival", f"trace:{AZURE}", "--requests", "100",
                             "--budget", "4096", "--json")
    assert code == 0, err
    assert any("first 100" in n for n in json.loads(out)["notes"])

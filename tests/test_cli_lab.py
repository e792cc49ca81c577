"""The lab commands of the CLI: ``region`` and ``reproduce`` (their libraries are tested in
tests/test_region.py and tests/test_reproduce.py; here: options, output, exit codes)."""

from __future__ import annotations

import json
import re

import pytest

from .helpers import run_cli

VERTEX_C = ["--budget", "128", "--k-max", "100", "--prefill", "290", "--decode", "990"]


def test_region_finds_vertex_c_and_the_binding_batch(capsys) -> None:
    code, out, _ = run_cli(capsys, "region", *VERTEX_C, "--arrival", "deterministic",
                           "--rate", "2.139037", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["vertex_c"]["batch"] == [29, 99]
    assert doc["exit_batch"] == [29, 99] and doc["exit_at_vertex"]
    assert doc["region_load"] == pytest.approx(1.0, abs=1e-6)
    assert [(v["batch_prefill_tokens"], v["batch_decode_tokens"]) for v in doc["vertices"]] == [
        (0, 100), (29, 99), (128, 0)
    ]


def test_region_load_and_margin(capsys) -> None:
    code, out, _ = run_cli(capsys, "region", *VERTEX_C, "--region-load", "0.97", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["region_load"] == pytest.approx(0.97) and doc["inside"]
    code, out, _ = run_cli(capsys, "region", *VERTEX_C, "--region-load", "0.97", "--margin",
                           "0.05", "--json")
    assert code == 0 and not json.loads(out)["inside"]
    code, out, _ = run_cli(capsys, "region", *VERTEX_C, "--region-load", "1.2")
    match = re.search(r"region load ([0-9.]+): outside", out)
    assert code == 0 and match and float(match.group(1)) == pytest.approx(1.2, rel=1e-8)


def test_region_plot_and_bad_path(tmp_path, capsys) -> None:
    png = tmp_path / "r.png"
    code, out, _ = run_cli(capsys, "region", *VERTEX_C, "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(C)" in out
    code, _, err = run_cli(capsys, "region", *VERTEX_C, "--plot", str(tmp_path / "r.pdf"))
    assert code == 2 and "--plot" in err and err.count("\n") == 1


def test_reproduce_example_writes_its_report(tmp_path, capsys) -> None:
    code, out, _ = run_cli(capsys, "reproduce", "example", "--out", str(tmp_path), "--quick")
    assert code == 0
    assert (tmp_path / "example.md").read_text().startswith("#")
    assert "NO" not in out and "wrote" in out
    code, _, err = run_cli(capsys, "reproduce", "fig7", "--out", str(tmp_path))
    assert code == 2 and "fig7" in err


def test_capacity_under_an_slo(capsys) -> None:
    code, out, _ = run_cli(capsys, "capacity", "--slo", "p99_ttft_ms=1000,p99_tpot_ms=150",
                           "--policies", "sarathi,vllm", "--slo-requests", "2000", "--json")
    assert code == 0
    doc = json.loads(out)
    rows = {r["policy"]: r for r in doc["slo_results"]}
    assert doc["slo"] == {"p99_ttft_ms": 1000.0, "p99_tpot_ms": 150.0}
    for row in rows.values():
        assert 0 < row["slo_rate"] < row["lowest_failing_rate"] <= row["bound_rate"]
        assert row["fraction_of_critical"] == pytest.approx(row["slo_rate"] / row["critical_rate"])
    assert rows["vllm"]["slo_rate"] < rows["sarathi"]["slo_rate"]
    assert "Student-t" in doc["slo_statement"]


def test_capacity_best_budget_for_a_rate(capsys) -> None:
    code, out, _ = run_cli(capsys, "capacity", "--slo", "p99_ttft_ms=1000", "--rate", "10",
                           "--best-budget", "--budgets", "128,256,512", "--slo-requests", "2000",
                           "--json")
    assert code == 0
    rows = json.loads(out)["slo_results"]
    assert [r["budget"] for r in rows] == [128, 256, 512]
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["passed"]
    assert best[0]["worst_ratio"] == min(r["worst_ratio"] for r in rows if r["passed"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slo", "p99_ttfx_ms=3"], "slo: unknown metric 'p99_ttfx_ms'"),
        (["--slo", "p99_ttft_ms=-3"], "slo: target of p99_ttft_ms must be a positive"),
        (["--budgets", "256"], "need --slo"),
        (["--slo", "p99_ttft_ms=3", "--budgets", "0,x"], "--budgets"),
        (["--slo", "p99_ttft_ms=3", "--slo-seeds", "1"], "--slo-seeds"),
    ],
)
def test_capacity_slo_bad_input(capsys, args, message) -> None:
    code, _, err = run_cli(capsys, "capacity", *args)
    assert code == 2 and message in err and err.count("\n") == 1

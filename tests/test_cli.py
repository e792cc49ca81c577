"""The ``llmqueue`` command line: JSON output, determinism, configs, request logs and bad input.

Everything runs in-process through ``llmqueue.cli.app.main`` except one test of the installed console
script. Runs are small (a few hundred requests) so the file stays fast.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import run_cli, run_json, strict_json

STAIRCASE = "staircase:c=11.28,a=35.47,b0=128"
SETTING = ["--batch-time", STAIRCASE, "--budget", "512", "--prefill", "129", "--decode", "112"]
SMALL = [*SETTING, "--requests", "300"]
POLICIES = ("fastertransformer", "vllm", "orca", "sarathi", "vllm-chunked", "kfcfs")
LATENCY_KEYS = [
    f"{stat}_{name}_ms"
    for stat in ("mean", "median", "p90", "p99")
    for name in ("ttft", "tpot", "itl", "e2el")
]
SIMULATE_KEYS = {
    "completed", "request_throughput", "output_throughput", "total_token_throughput",
    *LATENCY_KEYS,
    "mean_requests_in_system", "mean_backlog_tokens", "backlog_series", "policy", "budget",
    "rate", "load", "critical_rate", "capacity_tokens_per_s", "stable_predicted",
    "stable_observed", "backlog_slope_tokens_per_s", "wc_violations",
}
COMMON_HELP = (
    "--policy", "--budget", "--batch-time", "--rate", "--arrival", "--prefill", "--decode",
    "--requests", "--duration-s", "--seed", "--json", "--config",
)


_strict = strict_json


# -- 1. simulate --json ------------------------------------------------------------------------


def test_simulate_json_has_every_key_and_known_theory_values(capsys):
    doc = run_json(capsys, "simulate", *SMALL, "--load", "0.5", "--seed", "1")
    assert isinstance(doc, dict)
    missing = SIMULATE_KEYS - doc.keys()
    assert not missing, f"missing keys: {sorted(missing)}"
    assert doc["policy"] == "sarathi"
    assert doc["budget"] == 512
    assert round(doc["critical_rate"], 2) == 13.87
    assert doc["capacity_tokens_per_s"] == pytest.approx(3343, abs=0.5)
    assert doc["rate"] == pytest.approx(0.5 * doc["critical_rate"], rel=1e-12)
    assert doc["load"] == pytest.approx(0.5, rel=1e-12)
    # a stable sarathi run at half load serves everything
    assert doc["completed"] == 300
    assert doc["stable_predicted"] == "stable"
    assert doc["stable_observed"] in ("stable", "inconclusive")
    assert doc["wc_violations"] == 0
    for key in LATENCY_KEYS:
        assert isinstance(doc[key], float) and doc[key] > 0, key
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert doc[f"median_{name}_ms"] <= doc[f"p90_{name}_ms"] <= doc[f"p99_{name}_ms"]
    assert doc["mean_ttft_ms"] < doc["mean_e2el_ms"]
    assert doc["request_throughput"] > 0
    assert doc["output_throughput"] == pytest.approx(doc["request_throughput"] * 112, rel=1e-9)
    assert doc["total_token_throughput"] == pytest.approx(doc["request_throughput"] * 241, rel=1e-9)
    assert doc["mean_requests_in_system"] > 0 and doc["mean_backlog_tokens"] > 0
    series = doc["backlog_series"]
    assert len(series) > 10 and all(len(point) == 2 for point in series)
    assert [t for t, _ in series] == sorted(t for t, _ in series)


def test_simulate_json_is_one_strict_document_even_with_nan_metrics(capsys):
    # fastertransformer at 2x load leaves requests unfinished; undefined values become null
    code, out, err = run_cli(capsys, "simulate", *SETTING, "--requests", "60", "--load", "2",
                             "--policy", "fastertransformer", "--json")
    assert code == 0, err
    assert out.count("\n") == 1 and out.endswith("\n")
    doc = _strict(out)
    assert doc["stable_predicted"] != "stable"
    assert doc["load"] == pytest.approx(2.0)


# -- 2. determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(capsys):
    args = ["simulate", *SMALL, "--seed", "7", "--json"]
    first = run_cli(capsys, *args)
    second = run_cli(capsys, *args)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]
    other = run_cli(capsys, "simulate", *SMALL, "--seed", "8", "--json")
    assert other[0] == 0
    assert other[1] != first[1]
    assert _strict(other[1])["mean_ttft_ms"] != _strict(first[1])["mean_ttft_ms"]


# -- 3. every policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs(capsys, policy):
    doc = run_json(capsys, "simulate", *SETTING, "--requests", "150", "--load", "0.5",
                   "--policy", policy)
    assert doc["policy"] == policy
    assert doc["arrivals"] == 150
    assert 0 < doc["completed"] <= 150


def test_kfcfs_knobs_are_passed_through(capsys):
    knobs = ["--priority", "prefill", "--no-mixed", "--no-chunked", "--k-p", "2", "--k-d", "8"]
    base = ["simulate", *SETTING, "--requests", "150", "--load", "0.5", "--policy", "kfcfs"]
    plain = run_json(capsys, *base)
    tuned = run_json(capsys, *base, *knobs)
    assert tuned["policy"] == "kfcfs"
    assert tuned["arrivals"] == 150 and tuned["completed"] > 0
    # K_p/K_d caps make it non-work-conserving: no guarantee, and idle budget is reported
    assert plain["stable_predicted"] == "stable" and plain["wc_violations"] == 0
    assert tuned["stable_predicted"] != "stable" and tuned["wc_violations"] > 0
    # at most 8 decoders and 2 prompts per batch, never mixed: smaller batches than default
    assert tuned["mean_batch_requests"] <= 8
    assert tuned["mean_batch_requests"] < plain["mean_batch_requests"]
    # unchunked, unmixed prefill-first: a different schedule from the default kfcfs
    assert tuned["mean_ttft_ms"] != plain["mean_ttft_ms"]


# -- 4. --config -------------------------------------------------------------------------------


CONFIG_FLAGS = [
    "--policy", "orca", "--batch-time", STAIRCASE, "--budget", "256", "--prefill", "129",
    "--decode", "112", "--requests", "200", "--load", "0.7", "--seed", "3", "--k-max", "64",
]


def test_toml_and_yaml_config_match_the_flags(capsys, tmp_path):
    from_flags = run_cli(capsys, "simulate", *CONFIG_FLAGS, "--json")
    assert from_flags[0] == 0, from_flags[2]
    toml = tmp_path / "run.toml"
    toml.write_text(
        'policy = "orca"\n'
        f'batch-time = "{STAIRCASE}"\n'
        "budget = 256\nprefill = 129\ndecode = 112\nrequests = 200\nload = 0.7\nseed = 3\n"
        "k-max = 64\njson = true\n",
        encoding="utf-8",
    )
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "policy: orca\n"
        f"batch_time: '{STAIRCASE}'\n"
        "budget: 256\nprefill: '129'\ndecode: 112\nrequests: 200\nload: 0.7\nseed: 3\n"
        "k_max: 64\njson: true\n",
        encoding="utf-8",
    )
    for path in (toml, yaml_file):
        code, out, err = run_cli(capsys, "simulate", "--config", str(path))
        assert code == 0, err
        assert out == from_flags[1], path.name
    doc = _strict(from_flags[1])
    assert (doc["policy"], doc["budget"], doc["k_max"], doc["seed"]) == ("orca", 256, 64, 3)
    assert doc["arrivals"] == 200


def test_flag_overrides_config(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        f'batch_time = "{STAIRCASE}"\nbudget = 256\nrequests = 100\nrate = 3.0\n',
        encoding="utf-8",
    )
    doc = run_json(capsys, "simulate", "--config", str(path), "--budget", "384")
    assert doc["budget"] == 384
    assert doc["rate"] == pytest.approx(3.0)
    assert doc["arrivals"] == 100
    # --load on the command line beats rate from the file (no "not both" error)
    doc = run_json(capsys, "simulate", "--config", str(path), "--load", "0.5")
    assert doc["load"] == pytest.approx(0.5)
    assert doc["rate"] == pytest.approx(0.5 * doc["critical_rate"])


def test_config_unknown_key_is_named(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("budget: 256\nbugdet_typo: 1\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "simulate", "--config", str(path), "--requests", "20")
    assert code == 2
    assert out == ""
    assert "bugdet_typo" in err and "--config" in err
    assert len(err.strip().splitlines()) == 1


# -- 5. --requests-out -------------------------------------------------------------------------


REQUEST_FIELDS = ["id", "arrival_ms", "first_token_ms", "finish_ms", "prefill_tokens",
                  "decode_tokens"]


def _read_records(path: Path) -> list[dict[str, float]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == REQUEST_FIELDS
            return [{k: float(v) for k, v in row.items()} for row in reader]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        assert list(row) == REQUEST_FIELDS
    return rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_requests_out_has_one_record_per_arrival(capsys, tmp_path, suffix):
    out_path = tmp_path / f"out{suffix}"
    doc = run_json(capsys, "simulate", *SETTING, "--requests", "200", "--load", "0.6",
                   "--requests-out", str(out_path))
    rows = _read_records(out_path)
    assert len(rows) == doc["arrivals"] == doc["completed"] == 200
    assert [int(r["id"]) for r in rows] == list(range(200))
    assert all(r["prefill_tokens"] == 129 and r["decode_tokens"] == 112 for r in rows)
    assert all(r["arrival_ms"] <= r["first_token_ms"] <= r["finish_ms"] for r in rows)
    ttft = [r["first_token_ms"] - r["arrival_ms"] for r in rows]
    assert sum(ttft) / len(ttft) == pytest.approx(doc["mean_ttft_ms"], rel=1e-9)
    e2el = [r["finish_ms"] - r["arrival_ms"] for r in rows]
    assert sum(e2el) / len(e2el) == pytest.approx(doc["mean_e2el_ms"], rel=1e-9)


def test_requests_out_unfinished_requests_are_empty_or_null(capsys, tmp_path):
    out_path = tmp_path / "out.jsonl"
    doc = run_json(capsys, "simulate", "--policy", "vllm", "--budget", "128", "--prefill", "290",
                   "--decode", "10", "--requests", "20", "--requests-out", str(out_path))
    rows = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == doc["arrivals"] == 20
    assert all(r["first_token_ms"] is None and r["finish_ms"] is None for r in rows)


def test_requests_out_bad_extension(capsys, tmp_path):
    bad = tmp_path / "out.txt"
    code, out, err = run_cli(capsys, "simulate", *SETTING, "--requests", "20",
                             "--requests-out", str(bad))
    assert code == 2 and out == ""
    assert "--requests-out" in err and "out.txt" in err
    assert len(err.strip().splitlines()) == 1
    assert not bad.exists()


# -- 6. capacity -------------------------------------------------------------------------------


def test_capacity_known_values(capsys):
    doc = run_json(capsys, "capacity", *SETTING)
    assert doc["t_budget_ms"] == pytest.approx(153.16, abs=1e-9)
    assert round(doc["critical_rate"], 2) == 13.87
    assert doc["capacity_tokens_per_s"] == pytest.approx(3343, abs=0.5)
    assert doc["mean_prefill_tokens"] == 129 and doc["mean_decode_tokens"] == 112
    assert doc["kmax_load"] is None
    assert "best_budget" not in doc


def test_capacity_best_budget_under_iteration_cap(capsys):
    doc = run_json(capsys, "capacity", *SETTING, "--max-iteration-ms", "153.16")
    assert doc["best_budget"] == 512
    assert doc["best_budget_t_ms"] == pytest.approx(153.16)


def test_capacity_kmax_load_at_the_boundary(capsys):
    doc = run_json(capsys, "capacity", "--k-max", "100", "--budget", "128", "--arrival",
                   "deterministic", "--rate", "2.139037433", "--prefill", "290",
                   "--decode", "990")
    assert doc["k_max"] == 100
    assert doc["kmax_load"] == pytest.approx(1.0, abs=1e-6)


def test_capacity_text_output(capsys):
    code, out, err = run_cli(capsys, "capacity", *SETTING)
    assert code == 0, err
    assert "critical_rate" in out and "13.8710" in out


# -- 7. compare --------------------------------------------------------------------------------


def test_compare_writes_png_and_prints_every_policy(capsys, tmp_path):
    png = tmp_path / "x.png"
    code, out, err = run_cli(capsys, "compare", *SMALL, "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("fastertransformer", "vllm", "orca", "sarathi"):
        assert name in out
    assert str(png) in out


def test_compare_json_without_plot(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = run_json(capsys, "compare", *SMALL, "--plot", "")
    assert isinstance(docs, list) and len(docs) == 4
    assert [d["policy"] for d in docs] == ["fastertransformer", "vllm", "orca", "sarathi"]
    assert all(d.keys() >= SIMULATE_KEYS for d in docs)
    # one workload for all: same rate, same arrivals
    assert len({d["rate"] for d in docs}) == 1
    assert {d["arrivals"] for d in docs} == {300}
    assert list(tmp_path.iterdir()) == []


# -- 8. bad input ------------------------------------------------------------------------------


def _trace(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    """(extra args, words the single error line must contain)."""
    missing_col = _trace(tmp_path, "missing.csv", "arrived_at,num_prefill_tokens\n0.0,10\n1.0,20\n")
    negative = _trace(
        tmp_path, "negative.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,1\n1.0,20,-3\n",
    )
    ini = _trace(tmp_path, "run.ini", "budget = 1\n")
    broken_toml = _trace(tmp_path, "broken.toml", "budget = = 1\n")
    return [
        (["--rate", "-1"], ("--rate", "-1")),
        (["--rate", "0"], ("--rate", "0")),
        (["--budget", "0"], ("--budget", "0")),
        (["--k-max", "0"], ("--k-max", "0")),
        (["--batch-time", "staircase:c=1"], ("--batch-time", "staircase:c=1", "'a'")),
        (["--batch-time", "bogus:1"], ("--batch-time", "bogus")),
        (["--batch-time", "linear:c=x,a=1"], ("--batch-time", "linear:c=x,a=1")),
        (["--policy", "nope"], ("policy", "nope")),
        (["--prefill", "poisson:-3"], ("prefill", "poisson:-3")),
        (["--arrival", "gamma:cv=abc"], ("arrival", "gamma:cv=abc")),
        (["--arrival", "trace:/nonexistent.csv"], ("arrival", "/nonexistent.csv", "not found")),
        (["--arrival", f"trace:{missing_col}"], ("arrival", "num_decode_tokens", "missing.csv")),
        (["--arrival", f"trace:{negative}"], ("arrival", "num_decode_tokens", "-3")),
        (["--rate", "1", "--load", "0.5"], ("--rate", "--load")),
        (["--requests", "0"], ("--requests", "0")),
        (["--config", str(tmp_path / "absent.toml")], ("--config", "absent.toml")),
        (["--config", ini], ("--config", "run.ini")),
        (["--config", broken_toml], ("--config", "broken.toml")),
    ]


BAD_IDS = [
    "rate-negative", "rate-zero", "budget-zero", "kmax-zero", "bt-missing-key", "bt-kind",
    "bt-number", "policy", "prefill", "gamma-cv", "trace-missing", "trace-no-column",
    "trace-negative", "rate-and-load", "requests-zero", "config-missing", "config-ini",
    "config-broken",
]


@pytest.mark.parametrize("case", range(len(BAD_IDS)), ids=BAD_IDS)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, case):
    args, words = _bad_inputs(tmp_path)[case]
    base = [] if args[0] == "--requests" else ["--requests", "20"]
    code, out, err = run_cli(capsys, "simulate", *base, *args)
    assert code == 2, (args, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llmqueue: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("command", ["capacity", "compare"])
def test_bad_input_other_commands(capsys, command):
    code, out, err = run_cli(capsys, command, "--budget", "0")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--budget" in err
    code, out, err = run_cli(capsys, command, "--arrival", "gamma:cv=abc")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "gamma:cv=abc" in err


def test_compare_bad_policy_name(capsys, tmp_path):
    code, out, err = run_cli(capsys, "compare", "--policies", "vllm,nope", "--requests", "20",
                             "--plot", str(tmp_path / "x.png"))
    assert code == 2 and out == ""
    assert "nope" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


# -- 9. unservable settings end --------------------------------------------------------------


def test_unservable_setting_does_not_hang(capsys):
    doc = run_json(capsys, "simulate", "--policy", "vllm", "--budget", "128", "--prefill", "290",
                   "--decode", "10", "--requests", "50")
    assert doc["completed"] == 0
    assert doc["arrivals"] == 50
    assert doc["stable_observed"] == "unstable"
    assert any("can never be served" in note for note in doc["notes"])
    assert doc["mean_ttft_ms"] is None  # NaN written as null


# -- 10. --help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["simulate", "capacity", "compare"])
def test_help_lists_the_options(capsys, command):
    code, out, err = run_cli(capsys, command, "--help")
    assert code == 0
    assert err == ""
    expected = [o for o in COMMON_HELP if command == "simulate" or o != "--policy"]
    if command == "simulate":
        expected.append("--requests-out")
    if command == "compare":
        expected.extend(["--policies", "--plot"])
    if command == "capacity":
        expected.append("--max-iteration-ms")
    missing = [o for o in expected if o not in out]
    assert not missing, missing


def test_group_help_and_no_args(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("simulate", "capacity", "compare"):
        assert command in out
    code, out, _ = run_cli(capsys)
    assert code == 0 and "simulate" in out


def test_unknown_command_and_option(capsys):
    code, _, err = run_cli(capsys, "simulat")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "simulate", "--bugdet", "3")
    assert code == 2 and "--bugdet" in err and len(err.strip().splitlines()) == 1


# -- the installed console script --------------------------------------------------------------


def test_console_script_entry_point():
    script = Path(sys.executable).with_name("llmqueue")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    done = subprocess.run(
        [str(script), "simulate", *SETTING, "--requests", "100", "--load", "0.5", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    doc = _strict(done.stdout)
    assert doc["completed"] == 100
    assert round(doc["critical_rate"], 2) == 13.87
    bad = subprocess.run(
        [str(script), "simulate", "--budget", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "--budget" in bad.stderr
    assert math.isfinite(doc["mean_ttft_ms"])

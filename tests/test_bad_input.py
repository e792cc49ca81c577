"""Bad input, class by class: every case gives one line naming the field and the value, exit code 2
from the CLI and a typed exception (``LLMQueueError``) from the API; nothing hangs.

The classes follow issue 12: binary and non-UTF-8 files, huge numbers and the documented upper
bounds, config values of the wrong type, options a command or policy would silently ignore, and
misuse of the Python API. Sweep stores, network files and traces have their own files too
(test_store.py, test_network_verdict.py, test_trace_stream.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmqueue import (
    SARATHI,
    ConfigError,
    LLMQueueError,
    PlanError,
    StaircaseTime,
    analyze,
    fixed_requests,
    load_network,
    make_workload,
    simulate_network,
)
from llmqueue.limits import MAX_BUDGET_TOKENS, MAX_REQUESTS
from llmqueue.model.memory import parse_memory
from llmqueue.sim.run import simulate

from .helpers import SHARED_DATA, run_cli

AZURE = SHARED_DATA / "traces" / "azure_conv_2023.csv"
T = StaircaseTime(c=11.28, a=35.47, b0=128)


def assert_one_line(capsys: pytest.CaptureFixture[str], args: list[str], *words: str) -> str:
    """The command exits 2 with exactly one stderr line that mentions every word."""
    code, _, err = run_cli(capsys, *args)
    assert code == 2, (args, err)
    assert err.count("\n") == 1 and err.startswith("llmqueue: error: "), err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Binary and non-UTF-8 files with every extension a command reads."""
    made: dict[str, str] = {}
    garbage = bytes(range(256)) * 3
    for name in ("bin.toml", "bin.yaml", "bin.csv", "bin.jsonl", "bin.sqlite"):
        (tmp_path / name).write_bytes(garbage)
        made[name] = str(tmp_path / name)
    (tmp_path / "latin1.csv").write_bytes("n_tokens,time_ms\n1,2\n\xe9\xe8,3\n".encode("latin-1"))
    made["latin1.csv"] = str(tmp_path / "latin1.csv")
    return made


# -- binary and non-UTF-8 files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["simulate", "--config", "{bin.toml}"], "bin.toml"),
        (["simulate", "--config", "{bin.yaml}"], "bin.yaml"),
        (["simulate", "--batch-time", "table:{bin.csv}", "--requests", "5"], "bin.csv"),
        (["simulate", "--batch-time", "table:{latin1.csv}", "--requests", "5"], "latin1.csv"),
        (["simulate", "--arrival", "trace:{bin.csv}", "--requests", "5"], "bin.csv"),
        (["simulate", "--arrival", "trace:{bin.jsonl}", "--requests", "5"], "bin.jsonl"),
        (["simulate", "--prefill", "trace:{bin.csv}", "--requests", "5"], "bin.csv"),
        (["fit", "--data", "{bin.csv}"], "bin.csv"),
        (["fit", "--data", "{latin1.csv}"], "latin1.csv"),
        (["network", "analyze", "{bin.toml}"], "bin.toml"),
        (["network", "simulate", "{bin.yaml}"], "bin.yaml"),
        (["sweep", "{bin.toml}", "--dry-run"], "bin.toml"),
        (["results", "{bin.sqlite}"], "bin.sqlite"),
        (["trace", "stats", "{bin.csv}"], "bin.csv"),
        (["validate", "{bin.jsonl}"], "bin.jsonl"),
    ],
)
def test_binary_files_give_one_line(capsys, files, args, name) -> None:
    for key, path in files.items():
        args = [a.replace("{" + key + "}", path) for a in args]
    err = assert_one_line(capsys, args)
    assert name in err


# -- huge numbers and upper bounds --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["simulate", "--k-max", "99999999999999999999"], "--k-max"),
        (["simulate", "--budget", "99999999999999999999"], "--budget"),
        (["simulate", "--budget", "1e26"], "--budget"),
        (["simulate", "--requests", str(MAX_REQUESTS + 1)], "--requests"),
        (["simulate", "--requests", "99999999999999999999999"], "--requests"),
        (["simulate", "--seed", "99999999999999999999999"], "--seed"),
        (["simulate", "--seed", "-1"], "--seed"),
        (["simulate", "--rate", "1e308"], "--rate"),
        (["simulate", "--rate", "nan"], "--rate"),
        (["simulate", "--load", "inf"], "--load"),
        (["simulate", "--duration-s", "1e308"], "--duration-s"),
        (["simulate", "--drain-s", "nan"], "--drain-s"),
        (["simulate", "--k-p", "99999999999999999999", "--policy", "kfcfs"], "--k-p"),
        (["simulate", "--memory", "tokens=1e300"], "memory.tokens"),
        (["simulate", "--memory", "tokens=99999999999999999999"], "memory.tokens"),
        (["simulate", "--memory", "gpu_gib=1e300,params_b=8,layers=32,kv_heads=8,head_dim=128"],
         "memory.gpu_gib"),
        (["simulate", "--batch-time", "staircase:c=11,a=35,b0=1e30"], "b0"),
        (["simulate", "--batch-time", "staircase:c=11,a=35,b0=99999999999999999999"], "b0"),
        (["simulate", "--batch-time", "linear:c=1e300,a=1"], "c"),
        (["simulate", "--prefill", "99999999999999999999"], "prefill"),
        (["simulate", "--prefill", "uniform:1,1e30"], "prefill"),
        (["capacity", "--budget", "99999999999999999999"], "--budget"),
        (["capacity", "--slo", "p99_ttft_ms=1000", "--tolerance", "1e-17"], "--tolerance"),
        (["capacity", "--slo", "p99_ttft_ms=1000", "--slo-seeds", "1000000"], "--slo-seeds"),
        (["region", "--k-max", "99999999999999999999"], "--k-max"),
        (["region", "--region-load", "1e300"], "--region-load"),
        (["validate", "x", "--budget", "99999999999999999999"], "--budget"),
        (["trace", "stats", str(AZURE), "--busiest", "1e300"], "--busiest"),
        (["network", "simulate", "examples/networks/rs.toml", "--scale", "1e300"], "--scale"),
        (["network", "analyze", "examples/networks/rs.toml", "--scale", "nan"], "--scale"),
        (["network", "simulate", "examples/networks/rs.toml", "--requests", "1e30"], "--requests"),
        (["network", "simulate", "examples/networks/rs.toml", "--seed", "-3"], "--seed"),
        (["sweep", "examples/sweep.toml", "--dry-run", "--lock-timeout", "nan"], "--lock-timeout"),
    ],
)
def test_numbers_beyond_their_bound_give_one_line(capsys, args, field) -> None:
    assert_one_line(capsys, args, field)


def test_a_duration_that_brings_too_many_arrivals_is_refused(capsys) -> None:
    """rate x duration is bounded like --requests: a run the user cannot wait for is refused."""
    assert_one_line(capsys, ["simulate", "--rate", "1e7", "--duration-s", "1e9"], "duration_s")


def test_help_documents_the_bounds(capsys) -> None:
    code, out, _ = run_cli(capsys, "simulate", "--help")
    assert code == 0
    assert f"1<=x<={MAX_BUDGET_TOKENS}" in out.replace(" ", "").replace("\n", "")


# -- config files: types and values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("requests = 1.5\n", "requests"),
        ("requests = 1e400\n", "requests"),
        ("budget = 512.9\n", "budget"),
        ("budget = true\n", "budget"),
        ("json = 1\n", "json"),
        ("rate = 'fast'\n", "rate"),
        ("rate = nan\n", "rate"),
        ("prefill = {a = 1}\n", "prefill"),
        ("nonsense = 3\n", "nonsense"),
        ("requests = 99999999999999999999\n", "requests"),
    ],
)
def test_config_values_of_the_wrong_kind_are_refused(capsys, tmp_path, text, key) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    assert_one_line(capsys, ["simulate", "--config", str(path)], key)


def test_an_integral_float_in_a_config_is_an_integer(capsys, tmp_path) -> None:
    """TOML writes 3e2 as a float: an integral one is accepted as the integer it is."""
    path = tmp_path / "c.toml"
    path.write_text("requests = 3e2\nbudget = 512.0\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "simulate", "--config", str(path), "--json")
    assert code == 0, err
    assert '"arrivals": 300' in out and '"budget": 512' in out


# -- options a command or a policy would ignore ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["simulate", "--policy", "sarathi", "--k-p", "2"], "--k-p"),
        (["simulate", "--policy", "vllm", "--priority", "prefill"], "--priority"),
        (["simulate", "--policy", "orca", "--no-chunked"], "--chunked"),
        (["compare", "--policies", "sarathi,orca", "--k-d", "3", "--plot", ""], "--k-d"),
        (["capacity", "--k-p", "2"], "--k-p"),
        (["capacity", "--slo-seeds", "5"], "--slo"),
        (["capacity", "--tolerance", "0.1"], "--slo"),
        (["capacity", "--saturation-requests", "500"], "--memory"),
        (["sweep", "examples/sweep.toml", "--dry-run", "--ray-address", "auto"], "--ray-address"),
    ],
)
def test_ignored_knobs_are_refused(capsys, args, word) -> None:
    assert_one_line(capsys, args, word)


def test_kfcfs_knobs_are_taken_when_a_compared_policy_is_kfcfs(capsys) -> None:
    code, _, err = run_cli(capsys, "compare", "--policies", "sarathi,kfcfs", "--k-p", "2",
                           "--requests", "50", "--plot", "", "--json")
    assert code == 0, err


def test_trace_detection_ignores_case(capsys) -> None:
    """TRACE:path is a trace: it replays the file at its own rate (not Poisson at load 0.9)."""
    code, out, err = run_cli(capsys, "simulate", "--arrival", f"TRACE:{AZURE}", "--requests", "50",
                             "--budget", "4096", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["arrivals"] == 50
    assert any("first 50" in n for n in doc["notes"])  # the window of the trace is reported


# -- output paths are checked before the run ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["simulate", "--requests-out", "/nonexistent-folder/r.csv"], "--requests-out"),
        (["simulate", "--requests-out", "r.txt"], "--requests-out"),
        (["compare", "--plot", "/nonexistent-folder/x.png"], "--plot"),
        (["region", "--plot", "/nonexistent-folder/x.png"], "--plot"),
        (["network", "simulate", "examples/networks/rs.toml", "--plot", "/nonexistent/x.png"], "--plot"),
    ],
)
def test_unwritable_outputs_are_refused_before_the_run(capsys, args, word) -> None:
    assert_one_line(capsys, args, word)


def test_a_full_disk_names_the_file(capsys, tmp_path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    link = tmp_path / "r.csv"
    link.symlink_to("/dev/full")
    assert_one_line(capsys, ["simulate", "--requests", "20", "--requests-out", str(link)],
                    "No space left")


def test_a_killed_write_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    """Output files are replaced atomically: an error while writing keeps the old content."""
    from llmqueue.io.fileio import atomic_write

    path = tmp_path / "old.csv"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError), atomic_write(path) as out:
        out.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["old.csv"]


# -- the Python API -----------------------------------------------------------------------------

W = make_workload("poisson", "129", "112", rate_per_s=5.0)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: simulate([], SARATHI, T, 512), "source"),
        (lambda: simulate(None, SARATHI, T, 512), "source"),
        (lambda: simulate("poisson", SARATHI, T, 512, max_requests=5), "source"),
        (lambda: simulate([(0.0, 10, 10)], SARATHI, T, 512), "source"),
        (lambda: simulate(W, "nope", T, 512, max_requests=5), "policy"),
        (lambda: simulate(W, 42, T, 512, max_requests=5), "policy"),
        (lambda: simulate(W, SARATHI, "nope", 512, max_requests=5), "batch-time"),
        (lambda: simulate(W, SARATHI, 3.0, 512, max_requests=5), "batch_time"),
        (lambda: simulate(W, SARATHI, T, 10**30, max_requests=5), "budget"),
        (lambda: simulate(W, SARATHI, T, 512, max_requests=10**30), "requests"),
        (lambda: simulate(W, SARATHI, T, 512, memory="x", max_requests=5), "memory"),
        (lambda: simulate(W, SARATHI, T, 512, memory=5, max_requests=5), "memory"),
        (lambda: simulate(W, SARATHI, T, 512, goodput={"ttft": -1}, max_requests=5), "goodput"),
        (lambda: simulate(W, SARATHI, T, 512, goodput={"p99": 1}, max_requests=5), "goodput"),
        (lambda: simulate(W, SARATHI, T, 512, max_concurrency=0, max_requests=5), "max_concurrency"),
        (lambda: simulate(W, SARATHI, T, 512, max_concurrency=2, engine="compiled", max_requests=5),
         "engine"),
        (lambda: make_workload("poisson", "129", "112", rate_per_s=1e300), "rate"),
        (lambda: load_network(5), "network"),
        (lambda: load_network({"engines": 5}), "engines"),
        (lambda: simulate_network(None, max_requests=5), "network"),
        (lambda: simulate_network("/nonexistent.toml", max_requests=5), "network"),
        (lambda: analyze(3.5), "network"),
        (lambda: StaircaseTime(c=1, a=1, b0=10**30), "batch-time"),
    ],
)
def test_api_misuse_raises_the_projects_error(call, field) -> None:
    with pytest.raises(LLMQueueError) as info:
        call()
    assert isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)
    assert info.value.field.startswith(field), str(info.value)


@pytest.mark.parametrize("plan", ["x", [1, 2], 3, (1,)])
def test_a_policy_returning_no_mapping_breaks_a_named_rule(plan) -> None:
    requests = fixed_requests([(0.0, 4, 2)])
    with pytest.raises(PlanError) as info:
        simulate(requests, lambda view: plan, T, 512, engine="reference")
    assert info.value.rule == "plan is a mapping" and type(plan).__name__ in str(info.value)


def test_names_and_specs_are_accepted_where_a_user_obviously_means_them() -> None:
    """A policy name, a batch-time spec, a memory spec and a trace spec work like the objects."""
    by_name = simulate(W, "sarathi", "staircase:c=11.28,a=35.47,b0=128", 512, max_requests=50,
                       memory="tokens=100000", seed=3)
    by_object = simulate(W, SARATHI, T, 512, max_requests=50, seed=3, memory=parse_memory("tokens=100000"))
    assert by_name.requests == by_object.requests and by_name.requests
    replay = simulate(f"trace:{AZURE}", "sarathi", T, 4096, max_requests=20)
    assert replay.metrics.arrivals == 20
    by_path = simulate_network("examples/networks/agent.toml", max_requests=30, seed=1)
    by_object = simulate_network(load_network("examples/networks/agent.toml"), max_requests=30, seed=1)
    assert by_path.to_dict() == by_object.to_dict()
    rs = "examples/networks/rs.toml"
    assert analyze(rs).bottleneck == analyze(load_network(rs)).bottleneck

"""Sweeps and the results store: validation before any run, resume after a kill, queries.

The kill test starts a real ``llmqueue sweep`` process, kills it (SIGKILL, its workers too) once
some runs are stored, and reruns it: no finished run is lost and none is made twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmqueue.cli.app import main
from llmqueue.errors import ConfigError
from llmqueue.io.store import Store, run_key
from llmqueue.model.batchtime import parse_batch_time
from llmqueue.model.specs import make_workload
from llmqueue.policies.fcfs import make_policy
from llmqueue.sim.run import simulate
from llmqueue.studies.sweep import expand, grid_size, load_config, parse_config, run_sweep

from .helpers import run_cli

SMALL = """
[grid]
policies = ["sarathi", "vllm", {name = "kfcfs", priority = "prefill", k_p = 2}]
loads = [0.6, 1.2]
seeds = [0, 1]
k_max = ["none", 64]

[run]
requests = 400
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rows_in(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as con:
        try:
            return int(con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


SCRIPT = Path(sys.executable).with_name("llmqueue")


def start_sweep(config: Path, db: Path, *, workers: int, rows: int) -> subprocess.Popen[str]:
    """A real ``llmqueue sweep`` in its own process group, once ``rows`` runs are stored (or it
    ended; polled every 20 ms, 6000 times at most: the suite cannot hang here)."""
    proc = subprocess.Popen(
        [str(SCRIPT), "sweep", str(config), "--db", str(db), "--workers", str(workers),
         "--no-progress"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    for _ in range(6000):
        if rows_in(db) >= rows or proc.poll() is not None:
            break
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\npolices = ['sarathi']\nloads = [0.5]\n", r"grid\.polices: unknown key"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nbudgets = '512'\n", r"grid\.budgets"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nseeds = []\n", r"grid\.seeds: .*at least 1"),
        ("[grid]\npolicies = []\nloads = [0.5]\n", r"grid\.policies"),
        ("[grid]\npolicies = ['sarathi']\n", r"grid: give exactly one of rates and loads"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nrates = [1.0]\n",
         r"grid: give exactly one of rates and loads"),
        ("[grid]\npolicies = ['nope']\nloads = [0.5]\n", r"grid\.policies: unknown policy.*'nope'"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nbatch_times = ['linear:c=1']\n",
         r"grid\.batch_times"),
        ("[grid]\npolicies = ['sarathi']\nloads = [-0.5]\n", r"grid\.loads"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\n[run]\nrequests = 0\n", r"run\.requests"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\n[run]\nengine = 'warp'\n", r"run\.engine"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\n[[grid.workloads]]\nprefill = 'zipf:3'\n",
         r"grid\.workloads"),
        ("grid = 3\n", r"grid"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nmemory = 'tokens=5'\n",
         r"grid\.memory\.tokens: must be >= 16 \(got 'tokens=5'\)"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nmemory = ['none', 'tokens=8000,watermark=2']\n",
         r"grid\.memory\.watermark: must be < 1"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nmemory = ['tokens=8000', 3]\n", r"grid\.memory"),
        ("[grid]\npolicies = ['sarathi']\nloads = [0.5]\nmemory = 'gpu_gib=80'\n",
         r"grid\.memory: missing key 'params_b'"),
    ],
)
def test_bad_configs_fail_before_any_run_naming_the_key(tmp_path, capsys, text, message) -> None:
    config = write(tmp_path, text)
    db = tmp_path / "out.sqlite"
    code, _, err = run_cli(capsys, "sweep", str(config), "--db", str(db), "--workers", "1")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("llmqueue: error: ")

    assert re.search(message, err), err
    assert rows_in(db) == 0


def test_grid_expands_to_every_combination() -> None:
    config = parse_config({"grid": {"policies": ["sarathi", "orca"], "rates": {"start": 1.0,
                           "stop": 3.0, "num": 3}, "seeds": [0, 1], "budgets": [128, 512]}})
    runs = list(expand(config))
    assert len(runs) == 2 * 3 * 2 * 2
    assert len({run_key(r) for r in runs}) == len(runs)
    assert sorted({r["rate"] for r in runs}) == [1.0, 2.0, 3.0]


def test_a_stored_run_equals_the_same_simulate_call(tmp_path) -> None:
    config = parse_config({"grid": {"policies": ["orca"], "rates": [11.0], "seeds": [5]},
                           "run": {"requests": 800}})
    with Store(tmp_path / "r.sqlite") as store:
        outcome = run_sweep(config, store, workers=1)
        (row,) = list(store.rows())
    assert outcome.ran == 1 and outcome.total == 1
    direct = simulate(make_workload("poisson", "129", "112", 11.0), make_policy("orca"),
                      parse_batch_time("staircase:c=11.28,a=35.47,b0=128"), 512, seed=5,
                      max_requests=800, keep_requests=False)
    expected = json.loads(json.dumps(direct.metrics.as_dict(), allow_nan=True))
    for key in ("completed", "mean_ttft_ms", "p99_e2el_ms", "num_batches", "mean_backlog_tokens"):
        assert row[key] == expected[key]
    assert row["stable_observed"] == direct.observed.verdict


def test_resume_skips_stored_runs_and_workers_give_identical_results(tmp_path, capsys) -> None:
    config = write(tmp_path, SMALL)
    one, two = tmp_path / "one.sqlite", tmp_path / "two.sqlite"
    code, out, _ = run_cli(capsys, "sweep", str(config), "--db", str(one), "--workers", "1", "--json")
    assert code == 0 and json.loads(out)["ran"] == 24
    code, out, _ = run_cli(capsys, "sweep", str(config), "--db", str(one), "--json")
    assert code == 0 and json.loads(out) | {"wall_s": 0} == {
        "runs": 24, "already_stored": 24, "ran": 0, "skipped": 0, "duplicates_dropped": 0,
        "interrupted": False, "wall_s": 0, "db": str(one)
    }
    code, _, _ = run_cli(capsys, "sweep", str(config), "--db", str(two), "--workers", "2")
    assert code == 0
    with Store(one) as a, Store(two) as b:
        left = {r["key"]: r for r in a.rows()}
        right = {r["key"]: r for r in b.rows()}
    assert left.keys() == right.keys()
    for key, row in left.items():
        assert {k: v for k, v in row.items() if k != "wall_s"} == {
            k: v for k, v in right[key].items() if k != "wall_s"
        }


def test_killed_sweep_resumes_without_losing_or_repeating_runs(tmp_path) -> None:
    """A real process is killed (SIGKILL, with its workers) halfway; the rerun completes it."""
    config = write(tmp_path, """
[grid]
policies = ["sarathi", "orca", "vllm", "fastertransformer"]
loads = {start = 0.5, stop = 1.1, num = 10}
seeds = [0]

[run]
requests = 30000
""")
    db = tmp_path / "kill.sqlite"
    proc = start_sweep(config, db, workers=2, rows=3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored_before = rows_in(db)
    assert 3 <= stored_before < 40, "the kill must land halfway through the sweep"
    with Store(db) as store:
        keys_before = store.keys()
    rerun = subprocess.run(
        [str(SCRIPT), "sweep", str(config), "--db", str(db), "--workers", "2", "--json",
         "--no-progress"], capture_output=True, text=True, check=True,
    )
    outcome = json.loads(rerun.stdout)
    assert outcome["already_stored"] == stored_before
    assert outcome["ran"] == 40 - stored_before  # nothing finished is made again
    with Store(db) as store:
        assert len(store) == 40
        assert keys_before <= store.keys()
        assert store.keys() == {run_key(r) for r in expand(load_config(config))}


def test_interrupt_keeps_finished_runs(tmp_path) -> None:
    """Ctrl-C (SIGINT to the process group) ends the sweep with code 130 and a resume hint."""
    config = write(tmp_path, """
[grid]
policies = ["sarathi", "orca"]
loads = {start = 0.5, stop = 1.0, num = 20}

[run]
requests = 30000
""")
    db = tmp_path / "int.sqlite"
    proc = start_sweep(config, db, workers=1, rows=2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: finished runs are stored; rerun to resume" in err
    assert 2 <= rows_in(db) < 40


def test_results_query_and_export(tmp_path, capsys) -> None:
    config = write(tmp_path, SMALL)
    db = tmp_path / "q.sqlite"
    assert main(["sweep", str(config), "--db", str(db), "--workers", "1", "--no-progress"]) == 0
    code, out, _ = run_cli(capsys, "results", str(db), "--format", "json", "--where",
                           "policy=sarathi", "--where", "load>1", "--columns", "policy,load,k_max")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 4 and all(r["policy"] == "sarathi" and r["load"] == 1.2 for r in rows)
    assert sorted(str(r["k_max"]) for r in rows) == ["64", "64", "None", "None"]
    csv_path = tmp_path / "all.csv"
    code, _, _ = run_cli(capsys, "results", str(db), "--format", "csv", "--out", str(csv_path))
    lines = csv_path.read_text().splitlines()
    assert code == 0 and len(lines) == 25 and "p99_ttft_ms" in lines[0]
    code, out, _ = run_cli(capsys, "results", str(db), "--where", "k_max=none")
    assert code == 0 and "12 run(s)" in out
    code, _, err = run_cli(capsys, "results", str(db), "--columns", "policy,nonsense")
    assert code == 2 and "columns: unknown column" in err
    code, _, err = run_cli(capsys, "results", str(db), "--where", "load>>x")
    assert code == 2 and err.startswith("llmqueue: error: where")


def test_ray_backend_without_ray_names_the_extra(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    config = write(tmp_path, SMALL)
    code, _, err = run_cli(capsys, "sweep", str(config), "--db", str(tmp_path / "r.sqlite"),
                           "--backend", "ray")
    assert code == 2 and "pip install 'llmqueue[ray]'" in err


def test_workers_must_be_positive(tmp_path) -> None:
    config = parse_config({"grid": {"policies": ["sarathi"], "rates": [1.0]}})
    with Store(tmp_path / "w.sqlite") as store, pytest.raises(ConfigError, match=r"^workers"):
        run_sweep(config, store, workers=0)


def test_rows_keep_the_config_window_apart_from_the_run_length(tmp_path) -> None:
    config = parse_config({"grid": {"policies": ["sarathi"], "rates": [5.0]}, "run": {"requests": 300}})
    with Store(tmp_path / "d.sqlite") as store:
        run_sweep(config, store, workers=1)
        (row,) = list(store.rows())
    assert row["duration_s"] is None  # no arrival window was configured
    assert row["run_duration_s"] > 60.0  # the run itself: arrivals plus the drain
    assert row["rate"] == 5.0 and row["load"] == pytest.approx(5.0 / row["critical_rate"])


MEMORY = """
[grid]
policies = ["sarathi"]
loads = [0.9]
memory = ["tokens=6000", "none"]

[[grid.workloads]]
prefill = "64"
decode = "512"

[run]
requests = 300
"""


def test_memory_axis_runs_tight_and_unlimited_caches_under_distinct_keys(tmp_path, capsys) -> None:
    """A memory axis: the tight cache preempts, the unlimited one does not; every row carries the
    spec and the memory metrics; the unlimited run keeps the key of a sweep without memory."""
    config = load_config(write(tmp_path, MEMORY))
    runs = list(expand(config))
    assert [r.get("memory") for r in runs] == ["tokens=6000", None]
    assert "memory" not in runs[1]  # no cache: the configuration (and key) of a memory-free sweep
    plain = parse_config({"grid": {"policies": ["sarathi"], "loads": [0.9],
                                   "workloads": [{"prefill": "64", "decode": "512"}]},
                          "run": {"requests": 300}})
    assert run_key(runs[1]) == run_key(next(expand(plain)))
    assert len({run_key(r) for r in runs}) == 2
    db = tmp_path / "m.sqlite"
    code, out, _ = run_cli(capsys, "sweep", str(tmp_path / "sweep.toml"), "--db", str(db), "--workers", "1",
                           "--json")
    assert code == 0 and json.loads(out)["ran"] == 2
    with Store(db) as store:
        rows = {row["memory"]: row for row in store.rows()}
    tight, unlimited = rows["tokens=6000"], rows[None]
    assert tight["preemptions"] > 0 and tight["recomputed_tokens"] > 0 and tight["peak_kv_usage"] == 1.0
    assert tight["kv_capacity_tokens"] == 6000 and tight["rejected_requests"] == 0
    assert 0 < tight["mean_kv_usage"] <= 1
    assert unlimited["preemptions"] == 0 and unlimited["peak_kv_usage"] is None
    assert unlimited["kv_capacity_tokens"] is None
    assert tight["completed"] < unlimited["completed"]  # the cache binds: the backlog grows
    assert tight["stable_predicted"] == "unstable"  # the theory sees the cache too
    code, out, _ = run_cli(capsys, "results", str(db), "--where", "memory=none", "--format", "csv",
                           "--columns", "memory,preemptions")
    assert code == 0 and out.splitlines() == ["memory,preemptions", ",0"]
    code, out, _ = run_cli(capsys, "sweep", str(tmp_path / "sweep.toml"), "--db", str(db), "--json")
    assert code == 0 and json.loads(out)["already_stored"] == 2


def test_default_keys_are_unchanged_by_the_memory_axis() -> None:
    """The key of a run without memory is the one stored before sweeps knew memory (pinned)."""
    config = parse_config({"grid": {"policies": ["sarathi"], "rates": [5.0]}, "run": {"requests": 300}})
    (run,) = expand(config)
    assert run_key(run) == "8af61b7efe9de7df0d54707a8da2ce345656fe001efe36fbef07d9f5742f7975"
    one = parse_config({"grid": {"policies": ["sarathi"], "rates": [5.0], "memory": "tokens=8000"}})
    assert next(expand(one))["memory"] == "tokens=8000"


def test_results_table_shows_memory_columns_only_when_a_run_had_a_cache() -> None:
    from llmqueue.cli.sweep import SWEEP_COLUMNS, _sweep_columns

    assert _sweep_columns([{"memory": None}, {}]) == list(SWEEP_COLUMNS)
    columns = _sweep_columns([{"memory": None}, {"memory": "tokens=6000"}])
    assert columns[columns.index("k_max") + 1] == "memory"
    assert {"preemptions", "rejected_requests", "peak_kv_usage"} <= set(columns)


# -- bounds, grid size, duplicates ----------------------------------------------------------------

ONE = "[grid]\npolicies = ['sarathi']\nloads = [0.5]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ONE + "budgets = [100000000000000000000000000]\n",
         r"grid\.budgets\.0: .*less than or equal to 10000000"),
        (ONE + "k_max = [99999999999999999999]\n", r"grid\.k_max\.0: .*less than or equal to 10000000"),
        (ONE + "seeds = [99999999999999999999]\n", r"grid\.seeds\.0: .*less than or equal to"),
        (ONE + "memory = 'tokens=1e300'\n", r"grid\.memory\.tokens: must be <= 1e\+12"),
        (ONE + "batch_times = ['staircase:c=11.28,a=35.47,b0=1e30']\n", r"grid\.batch_times: .*b0"),
        (ONE + "[run]\nrequests = 1e400\n", r"run\.requests: .*valid integer \(got inf\)"),
        (ONE + "[run]\nrequests = 1.5\n", r"run\.requests: .*valid integer \(got 1\.5\)"),
        (ONE + "[run]\nrequests = 100000000000\n", r"run\.requests: .*less than or equal to 10000000000"),
        (ONE + "[run]\nduration_s = 1e300\n", r"run\.duration_s: .*less than or equal to 1000000000"),
        (ONE + "[run]\ndrain_s = 1e10\n", r"run\.drain_s: .*less than or equal to"),
        ("[grid]\npolicies = ['sarathi']\nrates = [1e300]\n",
         r"grid\.rates\.0: .*less than or equal to 10000000"),
        ("[grid]\npolicies = ['sarathi']\nloads = [5000.0]\n",
         r"grid\.loads\.0: .*less than or equal to 1000"),
        ("[grid]\npolicies = ['sarathi']\nloads = {start = 0.1, stop = 1e9, num = 3}\n", r"grid\.loads"),
        ("[grid]\npolicies = [{name = 'kfcfs', k_p = 99999999999}]\nloads = [0.5]\n",
         r"grid\.policies\.0\.\w*\.?k_p: .*less than or equal to 10000000"),
        ("[grid]\npolicies = ['sarathi']\nloads = {start = 0.1, stop = 1.0, num = 100000000}\n",
         r"grid\.loads: the grid has 100,000,000 runs, more than 1,000,000"),
        ("[grid]\npolicies = ['sarathi', 'orca']\nloads = {start = 0.1, stop = 1.0, num = 1000}\n"
         "seeds = {start = 1, stop = 1, num = 1}\n", r"grid\.seeds"),
    ],
)
def test_huge_numbers_fail_at_validation_naming_the_key(tmp_path, capsys, text, message) -> None:
    config = write(tmp_path, text)
    db = tmp_path / "out.sqlite"
    code, _, err = run_cli(capsys, "sweep", str(config), "--db", str(db), "--workers", "1")
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmqueue: error: "), err
    assert re.search(message, err), err
    assert not db.exists()


def test_a_huge_grid_is_refused_without_expanding_it() -> None:
    """10^8 loads x 100 seeds: counted from the axis lengths, refused at once (no MemoryError)."""
    data = {"grid": {"policies": ["sarathi"], "loads": {"start": 0.1, "stop": 1.0, "num": 10**8},
                     "seeds": list(range(100))}}
    with pytest.raises(ConfigError, match=r"grid\.loads: the grid has 10,000,000,000 runs"):
        parse_config(data)
    fits = parse_config({"grid": {"policies": ["sarathi", "orca"], "seeds": [0, 1],
                                  "loads": {"start": 0.1, "stop": 1.0, "num": 10**5}}})
    runs = expand(fits)
    assert next(runs)["load"] == 0.1 and next(runs)["seed"] == 1  # lazy: one run at a time
    assert grid_size(fits) == (4 * 10**5, 0)


def test_duplicate_grid_values_run_and_store_once(tmp_path, capsys) -> None:
    config = write(tmp_path, """
[grid]
policies = ["sarathi", " Sarathi", {name = "sarathi", priority = "prefill"}, "orca"]
loads = [0.5, 0.5, 0.9]
seeds = [0, 0]
k_max = ["none", 0]

[run]
requests = 200
""")
    runs = list(expand(load_config(config)))
    assert len(runs) == 4 and len({run_key(r) for r in runs}) == 4
    db = tmp_path / "d.sqlite"
    code, out, _ = run_cli(capsys, "sweep", str(config), "--db", str(db), "--dry-run")
    assert code == 0 and out.startswith("4 runs (44 duplicates dropped): 0 already in")
    code, out, _ = run_cli(capsys, "sweep", str(config), "--db", str(db), "--workers", "1")
    assert code == 0 and out.startswith("4 runs (44 duplicates dropped): 0 already stored, 4 ran in")
    assert rows_in(db) == 4
    code, out, _ = run_cli(capsys, "sweep", str(config), "--db", str(db), "--json")
    assert json.loads(out) | {"wall_s": 0} == {
        "runs": 4, "already_stored": 4, "ran": 0, "skipped": 0, "duplicates_dropped": 44,
        "interrupted": False, "wall_s": 0, "db": str(db)}


def test_ray_address_needs_the_ray_backend_and_workers_are_bounded(tmp_path, capsys) -> None:
    config = write(tmp_path, SMALL)
    db = tmp_path / "x.sqlite"
    for args in (["--ray-address", "ray://head:10001"], ["--workers", "100000"], ["--workers", "0"]):
        code, _, err = run_cli(capsys, "sweep", str(config), "--db", str(db), *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("llmqueue: error: "), err
        assert ("--ray-address needs --backend ray" in err) == (args[0] == "--ray-address")
    assert not db.exists()
    parsed = parse_config({"grid": {"policies": ["sarathi"], "rates": [1.0]}})
    with Store(tmp_path / "w.sqlite") as store:
        with pytest.raises(ConfigError, match=r"^ray_address: is used only with backend 'ray'"):
            run_sweep(parsed, store, ray_address="ray://head:10001")
        with pytest.raises(ConfigError, match=r"^workers: must be an integer from 1 to 1,024"):
            run_sweep(parsed, store, workers=1025)


# -- SIGTERM, two sweeps at once ------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """Child process ids of ``pid`` (from /proc: every thread's children)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


LONG = """
[grid]
policies = ["sarathi", "orca", "vllm", "fastertransformer"]
loads = {start = 0.5, stop = 1.1, num = 10}

[run]
requests = 30000
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigterm_stops_the_sweep_and_its_workers_cleanly(tmp_path) -> None:
    """SIGTERM to the sweep process alone (not its group): exit code 143, finished runs stored,
    claims released, and no worker survives it (communicate() returning proves that no process
    still holds the stderr pipe)."""
    config = write(tmp_path, LONG)
    db = tmp_path / "term.sqlite"
    proc = start_sweep(config, db, workers=2, rows=1)
    workers = children(proc.pid)
    stored = rows_in(db)
    assert proc.poll() is None and workers and stored >= 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.endswith("llmqueue: interrupted: finished runs are stored; rerun to resume\n")
    assert "Traceback" not in err
    assert not [pid for pid in workers if alive(pid)]
    assert stored <= rows_in(db) < 40
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)


def test_two_sweeps_on_one_store_run_every_run_once(tmp_path) -> None:
    """A sweep process and, once it has stored a run, a second sweep (this process) on the same
    file: every run runs in exactly one of them, and the counts say so."""
    config = write(tmp_path, """
[grid]
policies = ["sarathi", "orca"]
loads = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

[run]
requests = 6000
""")
    db = tmp_path / "both.sqlite"
    proc = subprocess.Popen(
        [str(SCRIPT), "sweep", str(config), "--db", str(db), "--workers", "1", "--json", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for _ in range(6000):  # bounded: 2 minutes at most
        if rows_in(db) >= 1 or proc.poll() is not None:
            break
        time.sleep(0.02)
    with Store(db) as store:
        here = run_sweep(load_config(config), store, workers=1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    there = json.loads(out)
    assert there["ran"] + here.ran == 12  # each run ran once, in one of the two
    assert there["already_stored"] + there["ran"] + there["skipped"] == 12
    assert here.already_done + here.ran + here.skipped == 12
    with Store(db) as store:
        assert len(store) == 12 and store.keys() == {run_key(r) for r in expand(load_config(config))}
        assert store.db.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)

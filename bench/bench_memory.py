"""Memory and time of long CLI runs and of large traces: each measured as a subprocess.

(a) Peak RSS of an unstable vLLM run (``llmqueue simulate --policy vllm --load 1.2``) of 2M, 4M
    and 10M requests (the CLI keeps no per-request records without ``--requests-out``), and for
    contrast of an unstable Sarathi-Serve run (load 1.05) of 10M. What still grows is the queue:
    vanilla vLLM holds ~80 % of its arrivals at the peak, Sarathi-Serve at 1.05 a few per cent.
(b) Time and peak RSS of ``llmqueue simulate --arrival trace:BIG.csv --requests 1000``, of a
    window of about 1,000 requests near the end of BIG.csv, and of the other trace uses, on a
    10M-row trace generated in a temporary directory from the Azure conversation trace (repeated,
    shifted in time; deleted afterwards).

    python bench/bench_memory.py [--quick] [--repeat R] [--skip-runs] [--skip-trace]

``--quick`` divides every size by 10. Peak RSS is the child's own maximum resident set size
(``os.wait4``), time its wall clock; rows print as they finish and medians come last. Figures
depend on the machine and on what else runs on it: quote medians and compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT.parent / "shared" / "data" / "traces" / "azure_conv_2023.csv"
LLMQUEUE = str(Path(sys.executable).with_name("llmqueue"))
RUN_SIZES = (2_000_000, 4_000_000, 10_000_000)
TRACE_ROWS = 10_000_000
WINDOW_REQUESTS = 1_000
AZURE_RATE_PER_S = 5.53
"""Mean rate of the Azure conversation trace (and so of BIG.csv): sizes the ~1,000-request window."""


REPLAY_ONLY = """
import sys
from llmqueue.model.specs import make_workload
workload = make_workload(sys.argv[1], None, None, None)
print(sum(chunk[0].shape[0] for chunk in workload.chunks(0, max_requests=int(sys.argv[2]))),
      workload.offered(int(sys.argv[2])))
"""
"""The replay alone, as a run takes it: make the workload, stream its first N requests, and their
rate and mean sizes (what simulate adds is the engine, and notes on the whole trace)."""


def measure(args: list[str], command: list[str] | None = None) -> tuple[float, float, int, str]:
    """Run ``llmqueue ARGS`` (or ``command``); return (wall s, peak RSS MiB, exit code, last line
    of stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command or [LLMQUEUE, *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode("utf-8", "replace").strip().splitlines()
    return wall, usage.ru_maxrss / 1024.0, proc.returncode, lines[-1] if lines else ""


def write_trace(path: Path, rows: int) -> float:
    """``rows`` requests: the Azure trace over and over, each copy one span (plus 1 s) later.
    Returns the last arrival (s)."""
    data = np.loadtxt(AZURE, delimiter=",", skiprows=1)
    times, tails = data[:, 0], [f",{int(p)},{int(d)}\n" for p, d in data[:, 1:]]
    period = float(times[-1] - times[0]) + 1.0
    done = copy = 0
    last = 0.0
    with open(path, "w", encoding="utf-8") as out:
        out.write("arrived_at,num_prefill_tokens,num_decode_tokens\n")
        while done < rows:
            m = min(len(tails), rows - done)
            shifted = (times[:m] + copy * period).tolist()
            out.write("".join(f"{t:.6f}{tail}" for t, tail in zip(shifted, tails[:m], strict=True)))
            last = shifted[-1]
            done, copy = done + m, copy + 1
    return last


def report(label: str, rows: list[tuple[float, float, int, str]]) -> None:
    walls, peaks = [r[0] for r in rows], [r[1] for r in rows]
    bad = [r for r in rows if r[2] != 0]
    note = f"  FAILED: {bad[0][3]}" if bad else ""
    print(f"{label:<66} {statistics.median(walls):>8.2f} s {statistics.median(peaks):>9,.0f} MiB"
          f"   (runs: {', '.join(f'{w:.1f}s/{p:,.0f}' for w, p, _, _ in rows)}){note}", flush=True)


def main() -> None:
    """Measure (a) long unstable runs and (b) a large trace; print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Every size divided by 10.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per trace measurement (median).")
    parser.add_argument("--run-repeat", type=int, default=1, help="Runs per long vLLM run.")
    parser.add_argument("--skip-runs", action="store_true", help="Leave out (a).")
    parser.add_argument("--skip-trace", action="store_true", help="Leave out (b).")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    quiet = ["--no-progress", "--json"]
    print(f"{'measurement':<66} {'wall':>10} {'peak RSS':>13}", flush=True)
    base = [measure(["simulate", "--requests", "1000", *quiet]) for _ in range(args.repeat)]
    report("startup: simulate --requests 1000 (poisson, defaults)", base)
    if not args.skip_runs:
        for n in (size // scale for size in RUN_SIZES):
            rows = [measure(["simulate", "--policy", "vllm", "--load", "1.2", "--requests", str(n), *quiet])
                    for _ in range(args.run_repeat)]
            report(f"(a) simulate --policy vllm --load 1.2 --requests {n:,}", rows)
        # for contrast: unstable too, but its queue grows by ~5 % of the arrivals, not ~80 %
        n = RUN_SIZES[-1] // scale
        rows = [measure(["simulate", "--policy", "sarathi", "--load", "1.05", "--requests", str(n), *quiet])
                for _ in range(args.run_repeat)]
        report(f"(a) simulate --policy sarathi --load 1.05 --requests {n:,}", rows)
    if args.skip_trace:
        return
    rows_n = TRACE_ROWS // scale
    with tempfile.TemporaryDirectory(prefix="llmqueue-bench-") as tmp:
        big = Path(tmp) / "big.csv"
        start = time.perf_counter()
        last = write_trace(big, rows_n)
        print(f"(b) wrote {rows_n:,} rows ({big.stat().st_size / 2**20:,.0f} MiB) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        width = WINDOW_REQUESTS / AZURE_RATE_PER_S
        w0 = round(0.95 * last)
        cases = [
            (f"--arrival trace:BIG --requests {WINDOW_REQUESTS}",
             ["--arrival", f"trace:{big}", "--requests", str(WINDOW_REQUESTS)]),
            (f"--arrival trace:BIG,start={w0},end={w0 + width:.0f} (~1,000)",
             ["--arrival", f"trace:{big},start={w0},end={w0 + width:.0f}"]),
            (f"--arrival trace:BIG --requests {WINDOW_REQUESTS} --rate 20",
             ["--arrival", f"trace:{big}", "--requests", str(WINDOW_REQUESTS), "--rate", "20"]),
            (f"--prefill/--decode trace:BIG --requests {WINDOW_REQUESTS} (poisson)",
             ["--arrival", "poisson", "--rate", str(AZURE_RATE_PER_S), "--prefill", f"trace:{big}",
              "--decode", f"trace:{big}", "--requests", str(WINDOW_REQUESTS)]),
        ]
        for label, extra in cases:
            report(f"(b) simulate {label}",
                   [measure(["simulate", "--budget", "2048", *extra, *quiet]) for _ in range(args.repeat)])
        replay = [sys.executable, "-c", REPLAY_ONLY, f"trace:{big}", str(WINDOW_REQUESTS)]
        report(f"(b) the replay alone: first {WINDOW_REQUESTS:,} requests of BIG (Python)",
               [measure([], replay) for _ in range(args.repeat)])
        report("(b) trace stats BIG", [measure(["trace", "stats", str(big), "--json"])
                                       for _ in range(args.repeat)])


if __name__ == "__main__":
    main()

"""The profiler against the H200 measurement: `llmqueue profile` on the same shapes and compositions.

Needs one CUDA GPU and torch (``pip install 'llmqueue[profile]'``). For each model of
``../shared/data/gpu/batch_times_h200.csv`` (llama3-8b, codellama-34b) it profiles that table's
points in CUDA-graph mode (``llmqueue profile MODEL --compare TABLE --mode graph``, one process per
model so each frees its GPU memory), writes ``out/profile_h200_MODEL.csv`` and prints, per
composition, the median and largest |ours / theirs - 1| of the median iteration times.
About 3 minutes on an H200 (the reference run's own length). On a CPU it refuses at once
(``--mode graph`` needs CUDA).

    python bench/validate_profile_h200.py [--table PATH] [--out DIR] [--models llama3-8b,codellama-34b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT.parent / "shared" / "data" / "gpu" / "batch_times_h200.csv"


def main() -> int:
    """Profile each model against the table; print the per-composition comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=str(TABLE))
    parser.add_argument("--out", default=str(ROOT / "out"))
    parser.add_argument("--models", default="llama3-8b,codellama-34b")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        out = Path(args.out) / f"profile_h200_{model}.csv"
        cmd = [
            sys.executable,
            "-m",
            "llmqueue.cli.app",
            "profile",
            model,
            "--device",
            "cuda",
            "--mode",
            "graph",
            "--compare",
            args.table,
            "--out",
            str(out),
            "--json",
            "--quiet",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{model}: failed ({done.returncode}): {done.stderr.strip()}")
            return done.returncode
        doc = json.loads(done.stdout)
        print(
            f"{model}: {len(doc['rows'])} points in {doc['seconds']:.0f} s on {doc['device_name']}, "
            f"torch {doc['torch_version']}; wrote {out}"
        )
        for fit in doc["fits"]:
            for f in fit["fits"]:
                print(f"  fit R^2 {f['r_squared']:.4f}  {f['spec']}")
        rows.extend(doc["compare"])
    header = ("model", "composition", "points", "median |r-1|", "max |r-1|", "median r")
    print(f"{header[0]:<15} {header[1]:<13} {header[2]:>6} {header[3]:>13} {header[4]:>10} {header[5]:>9}")
    for c in rows:
        print(
            f"{c['model']:<15} {c['composition']:<13} {c['points']:>6} {c['median_rel_error']:>13.3f} "
            f"{c['max_rel_error']:>10.3f} {c['median_ratio']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

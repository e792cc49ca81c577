"""Validation against a real engine run: the kernel-profile iteration model, the replay on a run
whose truth is known, the real vLLM run on an RTX PRO 6000, the command and its bad input.

The real run is ../shared/data/validation/rtxpro6000_llama31_8b (LLMServingSim's artifacts);
its profile is read once per module.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmqueue.cli.app import main
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import BatchShape, CompositionTime
from llmqueue.model.profile import (
    LAYER_KERNELS,
    LLAMA31_8B,
    MODEL_KERNELS,
    ModelDims,
    ProfileTime,
    parse_profile_spec,
    scale_factors,
)
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import VLLM_CHUNKED
from llmqueue.sim.run import simulate
from llmqueue.studies.validate import load_batch_time, memory_for, prepare, read_run, validate

from .conftest import SHARED_DATA

REAL = SHARED_DATA / "validation" / "rtxpro6000_llama31_8b"
RUN = REAL / "vllm_run"
PROFILE = REAL / "profile_tp1"
# the errors measured on the real run (docs/guide/validate.md), with a margin of 3 points
BOUNDS = {"ttft": 0.11, "tpot": 0.06, "e2el": 0.07}
MEDIAN_TTFT_BOUND = 0.16


def _rows(name: str) -> list[dict[str, str]]:
    with (PROFILE / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def raw() -> ProfileTime:
    return ProfileTime.from_dir(PROFILE, monotone=False)


@pytest.fixture(scope="module")
def envelope() -> ProfileTime:
    return ProfileTime.from_dir(PROFILE)


# ---------------------------------------------------------------- the profile model


def test_grid_points_reproduce_the_tables_exactly(raw: ProfileTime) -> None:
    for row in _rows("dense.csv"):
        assert raw.dense[row["layer"]](int(row["tokens"])) == float(row["time_us"])
    for row in _rows("per_sequence.csv"):
        assert raw.per_sequence[row["layer"]](int(row["sequences"])) == float(row["time_us"])
    rows = _rows("attention.csv")
    for row in rows[::7]:
        point = [float(row[k]) for k in ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode")]
        assert raw.attention.lookup_us(*point) == float(row["time_us"])


def test_iteration_is_the_profiled_kernels_summed_over_32_layers(raw: ProfileTime) -> None:
    # 128 decoders, each with 1024 cached tokens (+1 new): every size is a grid point
    dense = {(r["layer"], int(r["tokens"])): float(r["time_us"]) for r in _rows("dense.csv")}
    per_seq = {(r["layer"], int(r["sequences"])): float(r["time_us"]) for r in _rows("per_sequence.csv")}
    attention = next(float(r["time_us"]) for r in _rows("attention.csv")
                     if (r["prefill_chunk"], r["kv_prefill"], r["n_decode"], r["kv_decode"])
                     == ("0", "0", "128", "1024"))
    layer = sum(count * dense[(k, 128)] for k, count in LAYER_KERNELS.items()) + attention
    expected_us = (32 * layer + dense[("embedding", 128)] + dense[("final_layernorm", 128)]
                   + per_seq[("lm_head", 128)] + per_seq[("sampler", 128)])
    shape = BatchShape(0, 128, (), (), 128 * 1025, 128)
    assert raw.layers == 32
    assert raw.shape_time_ms(shape) == pytest.approx(expected_us / 1000, rel=1e-12)


def test_interpolation_is_linear_between_grid_points(raw: ProfileTime) -> None:
    curve = raw.dense["gate_up_proj"]
    assert curve(1032) == pytest.approx((curve(1024) + curve(1040)) / 2, rel=1e-12)
    a = raw.attention
    assert a.lookup_us(0, 0, 96, 1024) == pytest.approx(
        (a.lookup_us(0, 0, 64, 1024) + a.lookup_us(0, 0, 128, 1024)) / 2, rel=1e-12)
    # beyond the last grid point: proportional to the tokens (compute-bound)
    assert curve(4096) == pytest.approx(2 * curve(2048), rel=1e-12)


def test_envelope_is_monotone_in_tokens_and_never_below_the_table(raw: ProfileTime,
                                                                   envelope: ProfileTime) -> None:
    prefill = [envelope.shape_time_ms(BatchShape(n, 0, (n,), (0,), 0, 1)) for n in range(1, 2049, 3)]
    decode = [envelope.shape_time_ms(BatchShape(0, n, (), (), n * 1001, n)) for n in range(1, 257)]
    mixed = [envelope.shape_time_ms(BatchShape(n, 64, (n,), (700,), 64 * 1300, 65))
             for n in range(1, 1985, 5)]
    for series in (prefill, decode, mixed):
        assert np.all(np.diff(series) >= 0)
    # the raw profile has noisy dips (down_proj at 16 tokens is faster than at 1)
    assert raw.dense["down_proj"](16) < raw.dense["down_proj"](1)
    for name, curve in raw.dense.items():
        for size in curve.sizes:
            assert envelope.dense[name](size) >= curve(size)
    gate_up = raw.dense["gate_up_proj"]
    assert envelope.dense["gate_up_proj"](2048) == gate_up(2048)


def test_scaling_rule_between_shard_shapes(envelope: ProfileTime) -> None:
    half = LLAMA31_8B.shard(2)
    assert (half.heads, half.kv_heads, half.intermediate, half.vocab) == (16, 4, 7168, 64128)
    up = scale_factors(half, LLAMA31_8B)
    for kernel in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "act_fn", "attention", "lm_head",
                   "sampler", "rotary_emb"):
        assert up[kernel] == 2.0
    for kernel in ("layernorm", "final_layernorm", "embedding"):
        assert up[kernel] == 1.0
    assert scale_factors(LLAMA31_8B, LLAMA31_8B) == dict.fromkeys(up, 1.0)
    # the tp1 profile timed at the TP-2 shard: sharded kernels halve, norms stay
    shard = ProfileTime.from_dir(PROFILE, target=half)
    shape = BatchShape(300, 50, (300,), (0,), 50 * 800, 51)
    full, part = envelope.breakdown_us(shape), shard.breakdown_us(shape)
    assert part["attention_us"] == pytest.approx(full["attention_us"] / 2, rel=1e-12)
    assert part["lm_head_us"] == pytest.approx(full["lm_head_us"] / 2, rel=1e-12)
    norms = 2 * envelope.dense["layernorm"](350) * 32
    assert part["dense_us"] == pytest.approx(norms + (full["dense_us"] - norms) / 2, rel=1e-9)


def test_profile_tp1_ran_at_full_width(envelope: ProfileTime, raw: ProfileTime) -> None:
    """profile_meta.yaml's hf_overrides are the TP-2 shard; the tp1 times are the full model's."""
    assert any("TP-2 shard" in note for note in envelope.notes)
    # one row through the LM head streams its weights: at full vocab that is 1.47 TB/s of the
    # card's 1.79 TB/s; at the overrides' half vocab it would be 0.74 TB/s (41 %)
    full_bytes = LLAMA31_8B.vocab * LLAMA31_8B.hidden * 2
    bandwidth = full_bytes / (raw.per_sequence["lm_head"](1) * 1e-6)
    assert 1.3e12 < bandwidth < 1.79e12


def test_spec_round_trips(envelope: ProfileTime) -> None:
    again = load_batch_time(envelope.spec)
    assert isinstance(again, ProfileTime) and again.spec == envelope.spec
    shape = BatchShape(700, 90, (500, 200), (0, 3000), 90 * 1500, 91)
    assert again.shape_time_ms(shape) == envelope.shape_time_ms(shape)
    raw = parse_profile_spec(f"profile:{PROFILE},monotone=0,overhead_us=500")
    assert raw.spec.endswith(",monotone=0,overhead_us=500")
    assert raw.breakdown_us(shape)["overhead_us"] == 500


# ---------------------------------------------------------------- known truth


TRUE_MODEL = CompositionTime(c=4.0, prefill=0.02, decode=0.15, kv=2e-5, chunk=0.3, logit=0.01)


def _write_run(folder: Path, budget: int, k_max: int, n: int = 120) -> Path:
    """A vLLM-format run whose timestamps come from simulating TRUE_MODEL; returns its folder."""
    rng = np.random.default_rng(7)
    arrivals = np.cumsum(rng.exponential(60.0, n))
    prompts = rng.integers(20, 900, n)
    outputs = rng.integers(1, 200, n)
    requests = [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i] - 1)) for i in range(n)]
    result = simulate(requests, VLLM_CHUNKED, TRUE_MODEL, budget, k_max=k_max, drain_s=600)
    records = {r.id: r for r in result.requests or ()}
    wall, engine = 1_777_142_838.25, 479_748.5  # client wall clock and engine monotonic clock (s)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "requests.jsonl").open("w") as out:
        for i in range(n):
            r = records[i]
            t = engine + arrivals[i] / 1000
            out.write(json.dumps({
                "request_id": f"bench-{i}", "input_toks": int(prompts[i]), "output_toks": int(outputs[i]),
                "arrival_time": wall + arrivals[i] / 1000, "queued_ts": t, "scheduled_ts": t,
                "first_token_ts": engine + r.first_token_ms / 1000,
                "last_token_ts": engine + r.finish_ms / 1000,
            }) + "\n")
    meta = {"engine_kwargs": {"max_num_seqs": k_max, "max_num_batched_tokens": budget}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_replay_with_the_true_model_has_no_error(tmp_path: Path) -> None:
    folder = _write_run(tmp_path / "run", budget=256, k_max=24)
    log, settings = read_run(folder)
    assert (settings.max_num_batched_tokens, settings.max_num_seqs) == (256, 24)
    report = validate(log, TRUE_MODEL, 256, 24, None)
    assert len(report.rows) == 12
    for row in report.rows:
        assert abs(row.error) < 1e-5, row
    # a model twice as slow per token is seen as slower on every latency
    slow = CompositionTime(c=8.0, prefill=0.04, decode=0.3, kv=4e-5, chunk=0.6, logit=0.02)
    worse = validate(log, slow, 256, 24, None)
    assert worse.row("mean_tpot_ms").error > 0.5
    assert worse.row("mean_e2el_ms").error > 0.5


def test_command_takes_a_fitted_model_on_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _write_run(tmp_path / "run", budget=256, k_max=24, n=60)
    code = main(["validate", str(folder / "requests.jsonl"), "--batch-time", TRUE_MODEL.spec, "--json",
                 "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert (doc["budget"], doc["k_max"], doc["memory"]) == (256, 24, None)
    assert max(abs(r["error"]) for r in doc["rows"]) < 1e-5
    assert sorted(Path(p).name for p in doc["plots"]) == [
        "validate_e2el_cdf.png", "validate_tpot_cdf.png", "validate_ttft_cdf.png"]
    assert all(Path(p).stat().st_size > 0 for p in doc["plots"])


# ---------------------------------------------------------------- the real run


@pytest.fixture(scope="module")
def real_report(envelope: ProfileTime) -> Any:
    log, settings = read_run(RUN)
    memory = memory_for(settings)
    return validate(log, envelope, settings.max_num_batched_tokens, settings.max_num_seqs, memory)


def _measured_from_jsonl() -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in (RUN / "requests.jsonl").read_text().splitlines() if line]
    offset = min(r["queued_ts"] - r["arrival_time"] for r in rows)
    arrival = np.array([r["arrival_time"] + offset for r in rows])
    first = np.array([r["first_token_ts"] for r in rows])
    last = np.array([r["last_token_ts"] for r in rows])
    out = np.array([r["output_toks"] for r in rows])
    return {"ttft": (first - arrival) * 1000, "e2el": (last - arrival) * 1000,
            "tpot": ((last - first) / (out - 1))[out > 1] * 1000}


def test_real_run_setting_comes_from_its_files() -> None:
    log, settings = read_run(RUN)
    assert len(log) == 300
    assert (settings.max_num_batched_tokens, settings.max_num_seqs) == (2048, 128)
    assert (settings.model, settings.gpu_memory_gib, settings.gpu_utilization) == (
        "meta-llama/Llama-3.1-8B", 96.0, 0.9)
    memory = memory_for(settings)
    assert memory is not None
    # 96 GiB x 0.9 minus 8.03e9 bf16 parameters, at 128 KiB of K and V per token
    expected = (96 * 0.9 * 2**30 - 8.03e9 * 2) // (2 * 32 * 8 * 128 * 2)
    assert memory.capacity_tokens == expected - expected % 16


def test_real_run_measured_column_is_the_jsonl(real_report: Any) -> None:
    truth = _measured_from_jsonl()
    for metric, values in truth.items():
        expected = {"mean": values.mean(), "median": np.median(values),
                    "p90": np.percentile(values, 90), "p99": np.percentile(values, 99)}
        for stat, value in expected.items():
            assert real_report.row(f"{stat}_{metric}_ms").measured_ms == pytest.approx(value, rel=1e-9)


def test_real_run_errors_within_the_documented_bounds(real_report: Any) -> None:
    assert real_report.result.metrics.completed == 300
    assert real_report.result.metrics.preemptions == 0  # the cache is never full
    assert real_report.result.metrics.peak_kv_usage < 0.5
    for row in real_report.rows:
        bound = MEDIAN_TTFT_BOUND if row.key == "median_ttft_ms" else BOUNDS[row.metric]
        assert abs(row.error) <= bound, row
    # every latency is slightly underestimated: the profile leaves out host time between kernels
    assert all(row.error < 0 for row in real_report.rows)


# ---------------------------------------------------------------- bad input


def _error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = main(["validate", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "run: no such run folder" in _error_line(capsys, str(tmp_path / "missing"))
    assert "give a profile or a batch-time spec, not both" in _error_line(
        capsys, str(RUN), "--profile", str(PROFILE), "--batch-time", "constant:c=1")
    assert "profile: profile folder not found" in _error_line(
        capsys, str(RUN), "--profile", str(tmp_path / "nope"))
    assert "profile: profile file not found" in _error_line(capsys, str(RUN), "--profile", str(tmp_path))
    assert "memory: unknown key" in _error_line(capsys, str(RUN), "--memory", "lots=1")
    assert "batch-time" in _error_line(capsys, str(RUN), "--batch-time", "profile:")
    # a lone JSONL without meta.json: the budget must be given
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "requests.jsonl").write_text((RUN / "requests.jsonl").read_text())
    assert "budget: the run does not record max_num_batched_tokens" in _error_line(
        capsys, str(lone / "requests.jsonl"), "--batch-time", "constant:c=1")


def test_bad_profile_files(tmp_path: Path) -> None:
    folder = tmp_path / "profile_tp1"
    folder.mkdir()
    for name in ("dense.csv", "per_sequence.csv", "attention.csv"):
        (folder / name).write_text((PROFILE / name).read_text())
    # no meta: the model is unknown, so the number of layers must be given
    with pytest.raises(ConfigError) as err:
        ProfileTime.from_dir(folder)
    assert err.value.field == "profile.layers"
    assert ProfileTime.from_dir(folder, layers=32).layers == 32
    (folder / "attention.csv").write_text("prefill_chunk,kv_prefill,n_decode,time_us\n16,0,0,7.0\n")
    with pytest.raises(ConfigError, match="missing column 'kv_decode'"):
        ProfileTime.from_dir(folder, layers=32)
    (folder / "attention.csv").write_text((PROFILE / "attention.csv").read_text())
    (folder / "dense.csv").write_text("layer,tokens,time_us\nqkv_proj,1,abc\n")
    with pytest.raises(ConfigError, match="line 2 column 'time_us' is not a finite number: 'abc'"):
        ProfileTime.from_dir(folder, layers=32)
    (folder / "dense.csv").write_text("layer,tokens,time_us\nqkv_proj,1,3.0\n")
    with pytest.raises(ConfigError, match="no times for kernel"):
        ProfileTime.from_dir(folder, layers=32)
    with pytest.raises(ConfigError) as err:
        ModelDims("x", 32, 4096, 14336, 32, 8, 128, 0, 8.0)
    assert err.value.field == "profile.vocab"
    with pytest.raises(ConfigError, match="not divisible"):
        LLAMA31_8B.shard(3)


def test_run_without_output_tokens_is_refused(tmp_path: Path) -> None:
    line = json.loads((RUN / "requests.jsonl").read_text().splitlines()[0])
    line["output_toks"] = 0
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(line) + "\n")
    log, _ = read_run(path)
    with pytest.raises(ConfigError) as err:
        validate(log, TRUE_MODEL, 512, 8, None)
    assert err.value.field == "run.output_toks"


def test_prepare_reads_defaults_from_the_run_folder() -> None:
    setup = prepare(RUN)
    assert (setup.budget, setup.k_max) == (2048, 128)
    assert isinstance(setup.batch_time, ProfileTime)
    assert setup.memory is not None and setup.memory.capacity_tokens > 500_000
    assert prepare(RUN, memory="none", batch_time="constant:c=1").memory is None
    assert math.isclose(prepare(RUN, memory="tokens=4096", batch_time="constant:c=1").memory.capacity_tokens,
                        4096)
    assert MODEL_KERNELS == {"embedding": 1, "final_layernorm": 1}

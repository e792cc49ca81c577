"""``llmqueue profile``: model shapes from config.json, the grid, the measured table's format (read by
``--batch-time table:`` and ``llmqueue fit``), bad input, the missing-torch message, the comparison
with a reference table.

Times are measured, so nothing here asserts a timing value beyond "positive and finite": the
profile runs use the tiny shipped config on the CPU with a few points and 1-2 repeats (seconds).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import TableTime, parse_batch_time
from llmqueue.model.hfconfig import DecoderShape, load_shape, shape_from_config, shipped_names
from llmqueue.studies import gpuprofile as gp
from llmqueue.studies.fit import fit_data, load_data

from .helpers import SHARED_DATA, run_cli

H200 = SHARED_DATA / "gpu" / "batch_times_h200.csv"
LLAMA = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 128,
}


def _config(tmp_path: Path, config: object, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("llama3-8b", 8.03e9),
        ("codellama-34b", 33.7e9),
        ("llama3-70b", 70.6e9),
        ("mixtral-8x7b", 46.7e9),
    ],
)
def test_shipped_configs_have_the_published_sizes(name: str, published: float) -> None:
    assert abs(load_shape(name).parameters() / published - 1) < 0.01


def test_shipped_configs_are_package_data() -> None:
    assert shipped_names() == ["codellama-34b", "llama3-70b", "llama3-8b", "mixtral-8x7b", "tiny"]
    mixtral = load_shape("mixtral-8x7b")
    assert (mixtral.experts, mixtral.experts_per_token, mixtral.moe) == (8, 2, True)
    llama = load_shape("llama3-8b")
    assert (
        llama.hidden,
        llama.layers,
        llama.heads,
        llama.kv_heads,
        llama.head_dim,
        llama.intermediate,
        llama.vocab,
        llama.rope_theta,
        llama.rms_eps,
    ) == (4096, 32, 32, 8, 128, 14336, 128256, 500000.0, 1e-5)


def test_parameter_count_closed_form() -> None:
    s = shape_from_config(LLAMA, "t")
    per_layer = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 96 + 2 * 64
    assert s.head_dim == 16 and s.kv_heads == 2
    assert s.parameters() == 2 * 128 * 64 + 2 * per_layer + 64
    moe = shape_from_config({**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}, "m")
    assert moe.layer_parameters() == per_layer + 3 * 64 * 96 * (4 - 1) + 64 * 4  # 4 experts and a router


def test_tensor_parallel_shards_the_shapes() -> None:
    full = load_shape("llama3-70b")
    shard = full.sharded(8)
    assert (shard.heads, shard.kv_heads, shard.intermediate, shard.vocab, shard.hidden, shard.tp) == (
        8,
        1,
        3584,
        16032,
        8192,
        8,
    )
    assert full.sharded(16).kv_heads == 1  # KV heads replicated, as vLLM does
    assert full.sharded(1) is full
    with pytest.raises(ConfigError) as err:
        full.sharded(3)
    assert err.value.field == "tp" and err.value.value == 3


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size", None),
        ({**LLAMA, "num_hidden_layers": 0}, "num_hidden_layers", 0),
        ({**LLAMA, "intermediate_size": -5}, "intermediate_size", -5),
        ({**LLAMA, "vocab_size": 12.5}, "vocab_size", 12.5),
        ({**LLAMA, "num_attention_heads": 5}, "num_attention_heads", 5),
        ({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads", 3),
        ({**LLAMA, "num_local_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok", 3),
        ({**LLAMA, "rms_norm_eps": 0}, "rms_norm_eps", 0),
    ],
)
def test_bad_config_names_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config: dict[str, object], field: str, value: object
) -> None:
    path = _config(tmp_path, config)
    with pytest.raises(ConfigError) as err:
        load_shape(path)
    assert (err.value.field, err.value.value) == (field, value)
    code, out, stderr = run_cli(capsys, "profile", path)
    assert code == 2 and out == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"llmqueue: error: {field}:")


def test_bad_model_argument_gives_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "profile", "llama-9000")
    assert code == 2 and err.count("\n") == 1
    assert "model:" in err and "'llama-9000'" in err and "llama3-8b" in err and "tiny" in err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = run_cli(capsys, "profile", str(bad))
    assert code == 2 and err.count("\n") == 1 and "not JSON: line 1" in err
    code, _, err = run_cli(capsys, "profile", _config(tmp_path, [1, 2], "list.json"))
    assert code == 2 and "JSON object" in err
    code, _, err = run_cli(capsys, "profile", "tiny", "--tp", "3")
    assert code == 2 and err.startswith("llmqueue: error: tp:") and "(got 3)" in err


def test_missing_torch_says_how_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    code, out, err = run_cli(capsys, "profile", "tiny")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "pip install 'llmqueue[profile]'" in err


def test_profile_help_imports_no_torch() -> None:
    code = (
        "import sys\nfrom llmqueue.cli import main\n"
        "try:\n    main(['profile', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- the grid


def test_default_cuda_grid_is_the_h200_grid() -> None:
    """The built-in grid reproduces the H200 table's 67 compositions per model, in its order."""
    for model in ("llama3-8b", "codellama-34b"):
        assert gp.make_grid(gp.CUDA_GRID) == gp.read_grid(H200, model=model, mode="graph")


def test_cpu_grid_caps_the_kv_volume() -> None:
    points = gp.make_grid(gp.CPU_GRID)
    assert len(points) == 20
    assert all(p.decode_slots <= gp.CPU_GRID.kv_cap for p in points)
    assert all(
        p.n_tokens in gp.CPU_GRID.n_tokens and p.n_requests == p.decode_tokens + (p.prefill_tokens > 0)
        for p in points
    )


def test_grid_errors(tmp_path: Path) -> None:
    points = gp.make_grid(gp.GridSpec(n_tokens=(64,), compositions=("prefill",)))
    with pytest.raises(ConfigError) as err:
        gp.check_grid(points, 32)
    assert (err.value.field, err.value.value) == ("prefill_tokens", 64)
    with pytest.raises(ConfigError) as err:
        gp.make_grid(gp.GridSpec(n_tokens=(16,), compositions=("bogus",)))
    assert err.value.field == "compositions"
    grid = tmp_path / "grid.csv"
    grid.write_text("n_prefill_tokens,n_decode_tokens,decode_context,prefill_context\n16,-2,64,0\n")
    with pytest.raises(ConfigError) as err:
        gp.read_grid(grid)
    assert "n_decode_tokens" in str(err.value) and "line 2" in str(err.value)


# ---------------------------------------------------------------- measured (torch on the CPU)


def test_tiny_profile_table_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """profile -> CSV in the H200 format (+ device, dtype, timing) -> table: and fit read it."""
    pytest.importorskip("torch")
    out = tmp_path / "tiny.csv"
    code, stdout, _ = run_cli(
        capsys,
        "profile",
        "tiny",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--n-tokens",
        "8,32,64",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--out",
        str(out),
        "--json",
        "--quiet",
    )
    assert code == 0
    doc = json.loads(stdout)
    with out.open() as f:
        header = next(csv.reader(f))
    with H200.open() as f:
        h200_header = next(csv.reader(f))
    assert tuple(header) == gp.CSV_COLUMNS and header[: len(h200_header)] == h200_header
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(doc["rows"]) == 12
    for row in rows:
        low, mid, high = (float(row[c]) for c in ("min_ms", "median_ms", "max_ms"))
        assert all(math.isfinite(v) and v > 0 for v in (low, mid, high)) and low <= mid <= high
        assert int(row["n_tokens"]) == int(row["n_prefill_tokens"]) + int(row["n_decode_tokens"])
        assert (row["model"], row["device"], row["dtype"], row["mode"], row["tp"], row["layers_timed"]) == (
            "tiny",
            "cpu",
            "bf16",
            "eager",
            "1",
            "2/2",
        )
        assert "wall clock" in row["timing"] and "threads=1" in row["timing"] and "repeats=2" in row["timing"]
        assert row["torch_version"] == doc["torch_version"] and row["gpu_name"] == doc["device_name"]
    table = parse_batch_time(f"table:{out},model=tiny,mode=eager")
    assert isinstance(table, TableTime) and table.n_tokens == (8, 32, 64)
    (data,) = load_data(str(out))
    assert data.name == "tiny-eager" and len(data.time_ms) == 12
    result = fit_data(data)
    assert [f.to_dict() for f in result.fits] == doc["fits"][0]["fits"]
    piecewise = next(f.model for f in result.fits if f.kind == "piecewise")
    assert piecewise.c > 0 and piecewise.a >= 0
    composition = result.composition
    assert composition is not None
    assert all(v >= 0 for v in (composition.model.c, composition.model.prefill, composition.model.decode))
    assert max(composition.model.c, composition.model.floor) > 0
    for f in doc["fits"][0]["fits"]:
        assert parse_batch_time(f["spec"]).spec == f["spec"]
    assert run_cli(capsys, "fit", "--data", str(out))[0] == 0


def test_text_report_notes_cpu_tp_and_scaled_layers(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    code, out, err = run_cli(
        capsys,
        "profile",
        "tiny",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--tp",
        "2",
        "--layers",
        "1",
        "--n-tokens",
        "8,16",
        "--compositions",
        "prefill,mixed50",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert code == 0
    assert "all-reduces of tensor parallelism are NOT timed" in out and "no CUDA graphs" in out
    assert "1 of 2 layers timed and scaled" in out and "--batch-time" in out
    assert "tiny-tp2" in out and err.count("\n") == 4  # one progress line per point


def test_moe_config_profiles(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    shape = shape_from_config({**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}, "moe")
    points = gp.make_grid(
        gp.GridSpec(n_tokens=(6, 16), compositions=("prefill", "mixed50"), context=8, prefix=4)
    )
    run = gp.run_profile(
        shape, points, gp.ProfileSettings(device="cpu", dtype="fp32", warmup=0, repeats=1, threads=1)
    )
    assert [r.point for r in run.rows] == points
    assert all(r.median_ms > 0 and math.isfinite(r.median_ms) for r in run.rows)


def test_device_and_mode_errors(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    code, _, err = run_cli(capsys, "profile", "tiny", "--device", "cpu", "--mode", "graph")
    assert code == 2 and err.startswith("llmqueue: error: mode:") and "CUDA" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "profile", "tiny", "--device", "cuda")
        assert code == 2 and err.startswith("llmqueue: error: device:") and "'cuda'" in err
    code, _, err = run_cli(capsys, "profile", "tiny", "--device", "cpu", "--n-tokens", "64", "--budget", "32")
    assert code == 2 and err.count("\n") == 1 and "budget 32" in err
    code, _, err = run_cli(capsys, "profile", "tiny", "--device", "cpu", "--n-tokens", "16,-4")
    assert code == 2 and err.count("\n") == 1 and "--n-tokens" in err
    code, _, err = run_cli(capsys, "profile", "tiny", "--device", "cpu", "--layers", "3")
    assert code == 2 and err.startswith("llmqueue: error: layers:")


# ---------------------------------------------------------------- comparison


def _table(path: Path, medians: dict[tuple[str, int], float], mode: str = "graph") -> Path:
    lines = [",".join(gp.H200_COLUMNS)]
    for (composition, n), ms in medians.items():
        decoders = 0 if composition == "prefill" else n
        lines.append(
            f"m,GPU,2,{n},{n - decoders},{decoders},{max(decoders, 1)},{64 if decoders else 0},0,"
            f"{ms},{ms},{ms},{composition},{mode}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_tables_per_composition(tmp_path: Path) -> None:
    theirs = _table(
        tmp_path / "theirs.csv",
        {
            ("prefill", 16): 10.0,
            ("prefill", 32): 20.0,
            ("prefill", 64): 40.0,
            ("decode", 16): 8.0,
            ("decode", 32): 16.0,
            ("decode", 128): 1.0,
        },
    )
    ours = _table(
        tmp_path / "ours.csv",
        {
            ("prefill", 16): 11.0,
            ("prefill", 32): 18.0,
            ("prefill", 64): 52.0,
            ("decode", 16): 8.0,
            ("decode", 32): 20.0,
            ("decode", 999): 5.0,
        },
    )
    result = {c.composition: c for c in gp.compare_tables(ours, theirs)}
    assert list(result) == ["decode", "prefill", "all"]
    assert result["prefill"].points == 3 and result["decode"].points == 2 and result["all"].points == 5
    assert result["prefill"].median_rel_error == pytest.approx(0.1)
    assert result["prefill"].max_rel_error == pytest.approx(0.3)
    assert result["prefill"].median_ratio == pytest.approx(1.1)
    assert result["decode"].median_rel_error == pytest.approx(0.125)  # median of 0 and 0.25
    assert result["all"].median_rel_error == pytest.approx(0.1)
    other_mode = _table(tmp_path / "eager.csv", {("prefill", 16): 1.0}, mode="eager")
    with pytest.raises(ConfigError) as err:
        gp.compare_tables(other_mode, theirs)
    assert err.value.field == "compare"


def test_compare_option_profiles_the_reference_points(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    reference = _table(
        tmp_path / "ref.csv", {("prefill", 8): 1.0, ("decode", 8): 1.0, ("decode", 16): 1.0}, mode="eager"
    )
    code, out, _ = run_cli(
        capsys,
        "profile",
        "tiny",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--name",
        "m",
        "--compare",
        str(reference),
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        "--quiet",
    )
    assert code == 0
    doc = json.loads(out)
    assert [(r["composition"], r["n_tokens"]) for r in doc["rows"]] == [
        ("prefill", 8),
        ("decode", 8),
        ("decode", 16),
    ]
    assert {c["composition"]: c["points"] for c in doc["compare"]} == {"decode": 2, "prefill": 1, "all": 3}


def test_fit_reads_the_h200_table_by_path_as_the_named_data_set() -> None:
    """``llmqueue fit --data PATH`` of a batch-times table gives the shapes and times of ``--data h200``."""
    by_path = {d.name.removesuffix("-graph"): d for d in load_data(str(H200), where={"mode": "graph"})}
    by_name = {d.name.removeprefix("h200-"): d for d in load_data("h200", SHARED_DATA)}
    assert by_path.keys() == by_name.keys() == {"llama3-8b", "codellama-34b"}
    for model, data in by_path.items():
        assert (data.shapes, data.time_ms) == (by_name[model].shapes, by_name[model].time_ms)


def test_decoder_shape_is_a_plain_record() -> None:
    s = load_shape("tiny")
    assert isinstance(s, DecoderShape) and s.tp == 1 and not s.moe and s.query_groups == 4


def _reference_logits(model: object, batch: dict[str, object], caches: list[tuple[object, object]]) -> object:
    """The iteration written request by request in float64 from the same weights and the KV contents
    before it (``caches``): what the batched forward pass must compute."""
    import torch

    s, p = model.shape, batch["point"]  # type: ignore[attr-defined]
    m, d, prefix, context = p.prefill_tokens, p.decode_tokens, p.prefill_context, p.decode_context
    f64 = torch.float64

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.rms_eps) * w.to(f64)

    def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=f64) / s.head_dim)
        angles = positions.to(f64)[:, None] * inv[None, :]
        cos, sin = (
            torch.cat([angles, angles], -1).cos()[:, None],
            torch.cat([angles, angles], -1).sin()[:, None],
        )
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_from: int | None) -> torch.Tensor:
        k, v = k.repeat_interleave(s.query_groups, 1), v.repeat_interleave(s.query_groups, 1)  # [T, H, hd]
        scores = torch.einsum("qhd,khd->hqk", q, k) / s.head_dim**0.5
        if causal_from is not None:  # query i sees keys up to causal_from + i
            allowed = torch.arange(k.shape[0])[None, :] <= causal_from + torch.arange(q.shape[0])[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)

    positions = torch.cat([torch.arange(prefix, prefix + m), torch.full((d,), context - 1)])
    x = model.embed.to(f64)[batch["ids"]]  # type: ignore[attr-defined]
    for w, (kv_prefill, kv_decode) in zip(model.layers, caches, strict=True):  # type: ignore[attr-defined]
        qkv = rms(x, w["norm1"]) @ w["qkv"].to(f64).T
        q, k, v = qkv.split((s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim), -1)
        q = rope(q.reshape(-1, s.heads, s.head_dim), positions)
        k = rope(k.reshape(-1, s.kv_heads, s.head_dim), positions)
        v = v.reshape(-1, s.kv_heads, s.head_dim)
        outs = []
        if m:
            old_k = kv_prefill[0, 0, :, :prefix].transpose(0, 1).to(f64)
            old_v = kv_prefill[1, 0, :, :prefix].transpose(0, 1).to(f64)
            outs.append(attend(q[:m], torch.cat([old_k, k[:m]]), torch.cat([old_v, v[:m]]), prefix))
        for r in range(d):
            used = d * context * s.kv_heads * s.head_dim
            old_k = kv_decode[0, :used].view(d, context, s.kv_heads, s.head_dim)[r, : context - 1].to(f64)
            old_v = kv_decode[1, :used].view(d, context, s.kv_heads, s.head_dim)[r, : context - 1].to(f64)
            row = m + r
            outs.append(
                attend(
                    q[row : row + 1],
                    torch.cat([old_k, k[row : row + 1]]),
                    torch.cat([old_v, v[row : row + 1]]),
                    None,
                )
            )
        x = x + torch.cat(outs) @ w["o"].to(f64).T
        gate, up = (rms(x, w["norm2"]) @ w["gate_up"].to(f64).T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w["down"].to(f64).T
    rows = ([m - 1] if m else []) + list(range(m, m + d))
    return rms(x[rows], model.final_norm) @ model.lm_head.to(f64).T  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "point",
    [
        gp.Point("mixed", 5, 7, 3, 6),
        gp.Point("prefill", 6, 0, 0, 0),
        gp.Point("decode", 0, 0, 4, 9),
    ],
)
def test_forward_pass_equals_the_request_by_request_iteration(point: gp.Point) -> None:
    """The batched iteration (fused QKV, rotary, SDPA with GQA, lower-right causal chunk over its
    prefix, decoders over their contexts, last-token logits) equals a per-request float64 version."""
    torch = pytest.importorskip("torch")
    shape = shape_from_config({**LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2}, "t")
    model = gp._Decoder(torch, shape, shape.layers, [point], "cpu", torch.float32, seed=1)
    batch = model.inputs(point)
    caches = [(w["kv_prefill"].clone(), w["kv_decode"].clone()) for w in model.layers]
    with torch.inference_mode():
        logits = model.forward(batch, shape.layers)
    expected = _reference_logits(model, batch, caches)
    assert logits.shape == (point.n_requests, shape.vocab)
    assert torch.allclose(logits.to(torch.float64), expected, rtol=1e-4, atol=1e-4)


def test_layer_scaling_closed_form() -> None:
    """K of L layers timed: base + (L/K)(t - base), never below t; the order of repeats is kept."""
    assert gp._scaled([3.0, 5.0, 1.5], 1.0, 4.0) == [9.0, 17.0, 3.0]
    assert gp._scaled([0.5], 1.0, 4.0) == [0.5]  # a repeat below the base (noise) stays as timed


@pytest.mark.parametrize(("experts", "tokens"), [(4, 1), (2, 3)])
def test_moe_layer_equals_the_token_by_token_mixture(experts: int, tokens: int) -> None:
    """Router softmax, top-2, renormalised weights, each chosen expert's SwiGLU (no token over an
    expert's capacity in these cases: one token, or every token choosing every expert)."""
    torch = pytest.importorskip("torch")
    config = {**LLAMA, "num_local_experts": experts, "num_experts_per_tok": 2}
    shape = shape_from_config(config, "moe")
    point = gp.Point("prefill", tokens, 0, 0, 0)
    model = gp._Decoder(torch, shape, 1, [point], "cpu", torch.float64, seed=3)
    w = model.layers[0]
    h = torch.randn(tokens, shape.hidden, dtype=torch.float64)
    with torch.inference_mode():
        got = model._moe(h, w)
    expected = torch.zeros_like(h)
    for t in range(tokens):
        probs = (w["router"] @ h[t]).softmax(-1)
        top = probs.topk(2)
        for weight, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
            gate, up = (h[t] @ w["gate_up"][e]).chunk(2)
            expected[t] += weight * ((torch.nn.functional.silu(gate) * up) @ w["down"][e])
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)  # the router softmax runs in float32

"""``llmqueue profile``: batch times measured on this machine from a model's shapes, and their fits.

Not to be confused with ``validate --profile`` (:mod:`llmqueue.model.profile` reads kernel
profiles another tool measured): this command measures whole iterations itself, in PyTorch
(:mod:`llmqueue.studies.gpuprofile`), writes the H200 table's format and fits the batch-time
models to it with :mod:`llmqueue.studies.fit`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from llmqueue.cli.common import _check_out_path, _console, _dump, _int_list
from llmqueue.errors import ConfigError
from llmqueue.limits import MAX_BUDGET_TOKENS, MAX_SEED


@click.command("profile")
@click.argument("model")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where to run (default: cuda if available, else cpu).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default="bf16",
    show_default=True,
    help="Number type of weights, activations and KV cache.",
)
@click.option(
    "--mode",
    type=click.Choice(["graph", "eager"]),
    default=None,
    help="graph: CUDA-graph replays (CUDA only; the default there); eager: plain forwards (CPU).",
)
@click.option(
    "--tp",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Tensor-parallel degree: time one GPU's shard shapes (all-reduces not timed).",
)
@click.option(
    "--layers",
    type=click.IntRange(1),
    default=None,
    help="Build and time only this many decoder layers; times are scaled to the whole model.",
)
@click.option(
    "--n-tokens",
    "n_tokens",
    default=None,
    help="Token counts of the built-in grid, e.g. 16,64,256 (default: cpu 16-256, cuda the H200 grid).",
)
@click.option(
    "--compositions",
    default=None,
    help="Built-in compositions: prefill,decode,mixed50,mixed90,decode_L4096 (default: all; cpu: "
    "the first four).",
)
@click.option(
    "--context",
    type=click.IntRange(1, 10**7),
    default=None,
    help="Decoders' context length (KV entries read; cpu 256, cuda 1024).",
)
@click.option(
    "--prefix",
    type=click.IntRange(0, 10**7),
    default=None,
    help="Cached prefix of the mixed compositions' chunk (cpu 128, cuda 512).",
)
@click.option(
    "--grid",
    "grid_path",
    default=None,
    help="CSV of points instead: n_prefill_tokens,n_decode_tokens,decode_context,prefill_context "
    "[,composition].",
)
@click.option(
    "--budget",
    type=click.IntRange(1, MAX_BUDGET_TOKENS),
    default=None,
    help="Token budget b: refuse a grid with a batch or prefill chunk above it.",
)
@click.option(
    "--warmup",
    type=click.IntRange(0, 1000),
    default=None,
    help="Untimed iterations per point (cpu 1, cuda 3).",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 10_000),
    default=None,
    help="Timed iterations per point; the table gives their median, min, max (cpu 5, cuda 10).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 4096),
    default=None,
    help="CPU threads for torch (default: torch's; 1 is steadier on a busy machine).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="Seed of the random weights, KV contents and token ids.",
)
@click.option("--name", default=None, help="The table's model column (default: the config's name).")
@click.option("--out", "out", default=None, help="Write the measured table to this .csv file.")
@click.option(
    "--compare",
    "compare_path",
    default=None,
    help="A measured table in the same format (e.g. ../shared/data/gpu/batch_times_h200.csv): "
    "profile its points for this model and mode, and report |ours/theirs - 1| per composition.",
)
@click.option("--quiet", is_flag=True, help="No line per point on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def profile_cmd(
    model: str,
    device: str | None,
    dtype: str,
    mode: str | None,
    tp: int,
    layers: int | None,
    n_tokens: str | None,
    compositions: str | None,
    context: int | None,
    prefix: int | None,
    grid_path: str | None,
    budget: int | None,
    warmup: int | None,
    repeats: int | None,
    threads: int | None,
    seed: int,
    name: str | None,
    out: str | None,
    compare_path: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Measure t(n) for MODEL (a shipped config name, or a Hugging Face config.json path) by timing real
    decoder iterations with random weights (PyTorch), write the table and fit batch-time models to it.

    Shipped configs: tiny, llama3-8b, llama3-70b, codellama-34b, mixtral-8x7b. Needs torch:
    pip install 'llmqueue[profile]'.
    """
    from llmqueue.model.hfconfig import load_shape
    from llmqueue.studies import gpuprofile as gp

    _check_out_path(out, (".csv",), "--out")
    built_in = {
        "--n-tokens": n_tokens,
        "--compositions": compositions,
        "--context": context,
        "--prefix": prefix,
    }
    given = [k for k, v in built_in.items() if v is not None]
    if grid_path is not None and given:
        raise ConfigError("grid", grid_path, f"give --grid or {', '.join(given)}, not both")
    if compare_path is not None and given:
        raise ConfigError(
            "compare", compare_path, f"profiles the reference's points: drop {', '.join(given)}"
        )
    full = load_shape(model)
    shape = full.sharded(tp)
    label = name or (full.name if tp == 1 else f"{full.name}-tp{tp}")
    torch = gp.torch_or_error()
    device = gp.resolve_device(torch, device)
    on_cuda = device == "cuda"
    settings = gp.ProfileSettings(
        device=device,
        dtype=dtype,
        mode=mode or ("graph" if on_cuda else "eager"),
        warmup=(3 if on_cuda else 1) if warmup is None else warmup,
        repeats=(10 if on_cuda else 5) if repeats is None else repeats,
        layers=layers,
        seed=seed,
        threads=threads,
    )
    settings.check(shape)
    points = _points(
        gp, label, settings.mode, on_cuda, grid_path, compare_path, n_tokens, compositions, context, prefix
    )
    gp.check_grid(points, budget if budget is not None else max(p.n_tokens for p in points))
    progress = None if quiet else _progress
    run = gp.run_profile(shape, points, settings, name=label, progress=progress)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(out) if out is not None else Path(scratch) / "profile.csv"
        gp.write_rows(run.rows, path)
        fits, fit_note = _fits(path)
        comparison = gp.compare_tables(path, compare_path) if compare_path is not None else []
    doc: dict[str, Any] = {
        "model": label,
        "shape": full.describe(),
        "shard": shape.describe() if tp > 1 else None,
        "device": device,
        "device_name": run.device_name,
        "torch_version": run.torch_version,
        "dtype": dtype,
        "mode": settings.mode,
        "tp": tp,
        "timing": run.timing,
        "seconds": run.seconds,
        "out": out,
        "rows": [r.cells() for r in run.rows],
        "fits": [f.to_dict() for f in fits],
        "fit_note": fit_note,
        "compare": [c.to_dict() for c in comparison],
        "memory": full.memory_spec(tp),
    }
    if as_json:
        _dump(doc)
        return
    _print(doc, run, fits, comparison, on_cuda)


def _points(
    gp: Any,
    label: str,
    mode: str,
    on_cuda: bool,
    grid_path: str | None,
    compare_path: str | None,
    n_tokens: str | None,
    compositions: str | None,
    context: int | None,
    prefix: int | None,
) -> list[Any]:
    """The grid: a CSV's points, the reference's points for this model and mode, or the built-in grid."""
    if grid_path is not None:
        return list(gp.read_grid(grid_path))
    if compare_path is not None:
        return list(gp.read_grid(compare_path, model=label, mode=mode))
    base = gp.CUDA_GRID if on_cuda else gp.CPU_GRID
    spec = gp.GridSpec(
        n_tokens=tuple(_int_list(n_tokens, "--n-tokens")) if n_tokens is not None else base.n_tokens,
        compositions=tuple(c.strip() for c in compositions.split(",") if c.strip())
        if compositions is not None
        else base.compositions,
        context=base.context if context is None else context,
        prefix=base.prefix if prefix is None else prefix,
        kv_cap=base.kv_cap,
        long_context=base.long_context,
        long_max_tokens=base.long_max_tokens,
    )
    if not spec.compositions:
        raise ConfigError("compositions", compositions, "name at least one composition")
    return list(gp.make_grid(spec))


def _progress(row: Any) -> None:
    """One line per measured point on stderr."""
    p = row.point
    click.echo(
        f"  {p.composition:<12} n={p.n_tokens:>5} chunk={p.prefill_tokens:>5} prefix={p.prefill_context:>5}"
        f" decoders={p.decode_tokens:>5} context={p.decode_context:>5}  median {row.median_ms:9.3f} ms "
        f"(min {row.min_ms:.3f} max {row.max_ms:.3f})",
        err=True,
    )


def _fits(path: Path) -> tuple[list[Any], str | None]:
    """The fits of ``llmqueue fit --data PATH`` (one per model and mode), or a note why none."""
    from llmqueue.studies.fit import MIN_ROWS, fit_data, read_batch_times

    sets = read_batch_times(path)
    if any(len(d.time_ms) < MIN_ROWS for d in sets):
        return [], f"no fit: a fit needs at least {MIN_ROWS} points"
    try:
        return [fit_data(d) for d in sets], None
    except ConfigError as err:  # too few or too alike points for one of the models
        return [], f"no fit: {err}"


def _print(doc: dict[str, Any], run: Any, fits: list[Any], comparison: list[Any], on_cuda: bool) -> None:
    """The human-readable report."""
    console = _console()
    console.print(f"model   {doc['shape']}", soft_wrap=True)
    if doc["shard"]:
        console.print(
            f"tp      {doc['tp']}: timed one GPU's shard ({doc['shard']}); the all-reduces of tensor "
            "parallelism are NOT timed, so these times are a lower bound",
            soft_wrap=True,
        )
    console.print(
        f"device  {doc['device']} ({doc['device_name']}), torch {doc['torch_version']}, {doc['dtype']}, "
        f"mode {doc['mode']}",
        soft_wrap=True,
    )
    console.print(f"timing  {doc['timing']}", soft_wrap=True)
    if not on_cuda:
        console.print(
            "note    CPU: no CUDA graphs (eager only), wall-clock times include Python dispatch; "
            "they say how t(n) behaves on this CPU, not on a GPU",
            soft_wrap=True,
        )
    compositions = list(dict.fromkeys(r.point.composition for r in run.rows))
    table = Table(show_header=True, header_style="bold", title="median ms per iteration")
    table.add_column("n_tokens", justify="right")
    for c in compositions:
        table.add_column(c, justify="right")
    by_n: dict[int, dict[str, str]] = {}
    for r in run.rows:
        by_n.setdefault(r.point.n_tokens, {})[r.point.composition] = f"{r.median_ms:.3f}"
    for n in sorted(by_n):
        table.add_row(str(n), *(by_n[n].get(c, "") for c in compositions))
    console.print(table)
    console.print(
        f"{len(run.rows)} points in {run.seconds:.1f} s"
        + (f"; wrote {doc['out']}" if doc["out"] else " (add --out FILE.csv to keep the table)")
    )
    if doc["fit_note"]:
        console.print(doc["fit_note"])
    for result in fits:
        console.print(
            f"fits to {result.data.name} ({len(result.data.time_ms)} points, llmqueue fit's least "
            "squares); paste as --batch-time:",
            soft_wrap=True,
        )
        for f in result.fits:
            mark = "  <- better (adjusted R^2)" if f is result.better else ""
            console.print(f"  R^2 {f.r_squared:.4f}  {f.model.spec}{mark}", soft_wrap=True)
    if doc["out"]:
        console.print(
            f"measured table: --batch-time 'table:{doc['out']},model={doc['model']},mode={doc['mode']}'"
            f" (add ,composition=NAME for one mix); refit: llmqueue fit --data {doc['out']}",
            soft_wrap=True,
        )
    console.print(f"KV-cache memory of this model: --memory gpu_gib=GPU_GIB,{doc['memory']}", soft_wrap=True)
    if comparison:
        table = Table(show_header=True, header_style="bold", title="against the reference table")
        for col in (
            "model",
            "composition",
            "points",
            "median |ours/theirs-1|",
            "max |ours/theirs-1|",
            "median ours/theirs",
        ):
            table.add_column(col, justify="left" if col in ("model", "composition") else "right")
        for c in comparison:
            table.add_row(
                c.model,
                c.composition,
                str(c.points),
                f"{c.median_rel_error:.3f}",
                f"{c.max_rel_error:.3f}",
                f"{c.median_ratio:.3f}",
            )
        console.print(table)

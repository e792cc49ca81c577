"""Prefill/decode disaggregation: the ``disaggregated`` table and its errors, context tokens in the
engines, the pair's run (the same on every engine, conservation through transfers, the shared
link), its theory and the CLI's pair rows."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from llmqueue.engines.reference import Engine
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import parse_batch_time
from llmqueue.model.memory import KVCache
from llmqueue.model.network import Network, parse_network
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import make_policy
from llmqueue.sim.network import NetworkResult, _Run, simulate_network
from llmqueue.theory.network import analyze

from .helpers import SometimesZero, run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "networks" / "disagg.toml")


def pair_net(*, transfer: str = "fixed_ms=2,per_token_ms=0.01,link=shared", rate: float = 20.0,
             decode_memory: str | None = "tokens=6000", decode: str = "geometric:30",
             pair: dict | None = None, after: bool = False) -> dict:
    """A class through the pair ``llama`` (2 prefill replicas, 3 decode replicas with a KV cache),
    then, with ``after``, through a plain engine."""
    dec = {"budget": 64, "batch_time": "linear:c=6,a=0.05", "replicas": 3, "policy": "vllm-chunked"}
    if decode_memory is not None:
        dec["memory"] = decode_memory
    nodes = {"a": {"engine": "llama", "prefill": "poisson:300", "decode": decode,
                   "next": {"b": 0.5, "exit": 0.5} if after else "exit"}}
    engines = {"pre": {"budget": 512, "batch_time": "linear:c=4,a=0.02", "replicas": 2,
                       "policy": "vllm-chunked"}, "dec": dec}
    if after:
        nodes["b"] = {"engine": "post", "prefill": "50", "decode": "5", "next": "exit"}
        engines["post"] = {"budget": 128, "batch_time": "linear:c=2,a=0.01"}
    return {"engines": engines,
            "disaggregated": {"llama": pair or {"prefill": "pre", "decode": "dec", "transfer": transfer}},
            "classes": {"c": {"rate": rate, "start": "a", "nodes": nodes}}}


# -- the file format ----------------------------------------------------------------------------------


def test_a_pair_is_parsed_with_its_transfer() -> None:
    net = parse_network(pair_net())
    pair = net.pairs["llama"]
    assert (pair.prefill, pair.decode, pair.fixed_ms, pair.per_token_ms, pair.shared_link) == (
        "pre", "dec", 2.0, 0.01, True)
    assert pair.transfer_ms(100) == 3.0
    assert net.parts_of("llama") == (("pre", "prefill"), ("dec", "decode"))
    assert net.members_of("llama") == ("pre/0", "pre/1", "dec/0", "dec/1", "dec/2")
    assert not parse_network(pair_net(transfer="fixed_ms=1")).pairs["llama"].shared_link


@pytest.mark.parametrize(("pair", "match"), [
    ({"prefill": "pre", "decode": "dec", "transfer": "fixed_ms=-1"},
     r"^disaggregated\.llama\.transfer\.fixed_ms: must be a finite number >= 0 \(got '-1'\)"),
    ({"prefill": "pre", "decode": "dec", "transfer": "per_token_ms=x"},
     r"^disaggregated\.llama\.transfer\.per_token_ms: must be a number"),
    ({"prefill": "pre", "decode": "dec", "transfer": "fixed_ms=1,link=private"},
     r"^disaggregated\.llama\.transfer\.link: choose from shared"),
    ({"prefill": "pre", "decode": "dec", "transfer": "fixed=1"},
     r"^disaggregated\.llama\.transfer: unknown parameter 'fixed'"),
    ({"prefill": "prefil", "decode": "dec"}, r"^disaggregated\.llama\.prefill: unknown engine or pool"),
    ({"prefill": "pre", "decode": "llama"}, r"^disaggregated\.llama\.decode: a pair cannot name itself"),
    ({"prefill": "pre", "decode": "pre"}, r"^disaggregated\.llama\.decode: prefill and decode must be"),
    ({"prefill": "pre", "decode": "dec/0"}, r"^disaggregated\.llama\.decode: unknown engine or pool"),
    ({"prefill": "pre"}, r"disaggregated\.llama\.decode"),
    ({"prefill": "pre", "decode": "dec", "link": "shared"}, r"disaggregated\.llama\.link"),
])
def test_bad_pairs_name_the_key(pair: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_network(pair_net(pair=pair))


def test_a_pair_named_like_an_engine_is_refused() -> None:
    spec = pair_net()
    spec["disaggregated"] = {"pre": {"prefill": "post", "decode": "dec"}}
    spec["engines"]["post"] = {"budget": 64}
    with pytest.raises(ConfigError, match=r"^disaggregated\.pre: a pair's name must differ"):
        parse_network(spec)


def test_a_decode_cache_too_small_for_one_request_is_an_error() -> None:
    net = parse_network(pair_net(decode_memory="tokens=256"))  # 300 + 30 tokens per request
    with pytest.raises(ConfigError, match=r"^disaggregated\.llama\.decode: engine dec/0's KV cache"):
        analyze(net)
    with pytest.raises(ConfigError, match=r"^disaggregated\.llama\.decode"):
        simulate_network(net, max_requests=10)


# -- context tokens in the engines --------------------------------------------------------------------


def test_context_tokens_take_kv_blocks_and_are_recomputed_on_preemption() -> None:
    """A decode-only request bringing 40 tokens of KV needs blocks for 41 tokens to start; in a
    cache of 96 tokens (6 blocks of 16) two such requests cannot both grow past 48 tokens, so the
    newest is preempted and recomputes its context plus its decoded tokens as a prompt."""
    from llmqueue.engines.fast import FastEngine
    from llmqueue.engines.metrics import Recorder

    memory = KVCache(96, block_tokens=16, watermark=0.0)
    outcomes = []
    for engine_class in (Engine, FastEngine):
        rec = Recorder()
        eng = engine_class(make_policy("vllm-chunked"), parse_batch_time("constant:c=1"), 64,
                           memory=memory, recorder=rec)
        eng.submit(Request(0, 0.0, 0, 20, context_tokens=40))
        eng.submit(Request(1, 0.0, 0, 20, context_tokens=40))
        assert [(j.cached, j.blocks) for j in eng.jobs()] == [(40, 0), (40, 0)]
        eng.step()  # admitted: blocks for 41 tokens each
        assert [j.blocks for j in eng.jobs()] == [3, 3]
        done = []
        while eng.in_system:
            done.extend(eng.step())
        m = rec.finish(eng.now_ms)
        assert sorted(r.id for r in done) == [0, 1]
        # at 48 tokens each both need a 4th block: the newest is preempted and recomputes 48
        assert (m.preemptions, m.recomputed_tokens) == (1, 48)
        outcomes.append(sorted((r.id, r.first_token_ms, r.finish_ms) for r in done))
    assert outcomes[0] == outcomes[1]
    with pytest.raises(ConfigError, match=r"^request\.context_tokens: must be an integer >= 0"):
        Request(0, 0.0, 0, 1, context_tokens=-1)


def test_a_request_whose_context_cannot_fit_is_refused() -> None:
    from llmqueue.engines.metrics import Recorder

    rec = Recorder()
    eng = Engine(make_policy("sarathi"), parse_batch_time("constant:c=1"), 64,
                 memory=KVCache(96, block_tokens=16, watermark=0.0), recorder=rec)
    eng.submit(Request(0, 0.0, 0, 10, context_tokens=90))
    assert eng.in_system == 0 and rec.totals.rejected_requests == 1


# -- the run -----------------------------------------------------------------------------------------


def _conserved(result: NetworkResult) -> None:
    for p in result.pairs.values():
        assert p.arrivals == p.completed + p.in_prefill + p.in_transfer + p.in_decode + p.rejected
        assert p.transfers_started == p.transfers_finished + p.in_transfer
    for c in result.classes.values():
        assert c.arrivals == c.completed + c.in_network + c.rejected


@pytest.mark.parametrize("kwargs", [
    {"max_requests": 400},
    {"duration_s": 8.0, "drain_s": 0.0},
    {"max_requests": 300, "drain_s": 0.05},
])
def test_every_engine_gives_the_same_pair_run_and_requests_are_conserved(kwargs: dict) -> None:
    """Compiled prefill engines (auto), the fast and the reference engines: the same run to the
    bit; at every end, arrivals = completed + in prefill + in transfer + in decode + rejected."""
    net = parse_network(pair_net(after=True, rate=30.0))
    runs = [simulate_network(net, seed=3, engine=kind, **kwargs) for kind in ("auto", "fast", "reference")]
    docs = [r.to_dict() for r in runs]
    for doc in docs[1:]:
        assert doc["pairs"] == docs[0]["pairs"]
        assert doc["classes"] == docs[0]["classes"]
        assert doc["engines"].keys() == docs[0]["engines"].keys()
    for r in runs:
        _conserved(r)
    assert runs[0].pairs["llama"].completed > 0


def test_the_pair_latencies_and_the_shared_link() -> None:
    """TTFT, TPOT and E2EL per pair (and for its single-visit class); with a slow shared link
    transfers queue (positive mean wait) and the link's busy fraction is near its load."""
    net = parse_network(pair_net(transfer="fixed_ms=20,per_token_ms=0.05,link=shared", rate=20.0,
                                 decode_memory=None))
    r = simulate_network(net, seed=1, max_requests=1500)
    p = r.pairs["llama"]
    load = r.analysis.pairs["llama"]
    assert load.link_rho == pytest.approx(20.0 * (20 + 0.05 * 300) / 1000)  # 0.7
    assert p.shared_link and p.mean_transfer_wait_ms > 0
    assert p.link_utilisation == pytest.approx(load.link_rho, rel=0.1)
    assert p.transfers_started == p.completed == 1500
    lat = p.latency
    assert lat["mean_ttft_ms"] > 0 and lat["p99_tpot_ms"] >= lat["median_tpot_ms"] > 0
    assert r.classes["c"].request_latency == lat
    assert r.classes["c"].latency["mean_e2el_ms"] == pytest.approx(lat["mean_e2el_ms"])
    delay = simulate_network(parse_network(pair_net(transfer="fixed_ms=20,per_token_ms=0.05", rate=20.0,
                                                    decode_memory=None)), seed=1, max_requests=1500)
    plain = delay.pairs["llama"]
    assert plain.mean_transfer_wait_ms == 0 and math.isnan(plain.link_utilisation)
    # TPOT counts the transfer: (decode finish - first token) / d, so a slower link raises it
    assert lat["mean_tpot_ms"] > delay.pairs["llama"].latency["mean_tpot_ms"]


def test_visits_without_output_or_prompt_skip_a_side() -> None:
    """d = 0: the visit ends at its first token (no transfer, no decode); p = 0: nothing to
    prefill nor move, it decodes at once; p = d = 0: skipped. The same on every engine."""
    net = parse_network(pair_net(decode_memory="tokens=6000"))
    node = net.classes["c"].nodes["a"]
    zeros = dataclasses.replace(node, prefill=SometimesZero(node.prefill, 0.3),
                                decode=SometimesZero(node.decode, 0.3))
    net = Network(net.engines, {"c": dataclasses.replace(net.classes["c"], nodes={"a": zeros})},
                  net.pools, net.pairs)
    runs = [simulate_network(net, seed=2, max_requests=300, engine=k) for k in ("auto", "reference")]
    assert runs[0].to_dict()["pairs"] == runs[1].to_dict()["pairs"]
    p = runs[0].pairs["llama"]
    _conserved(runs[0])
    decoded = sum(runs[0].engines[f"dec/{i}"].metrics.arrivals for i in range(3))
    # about 0.49 of the visits have both sides, 0.21 only a prompt, 0.21 only an output, 0.09 none
    assert p.arrivals < 300 and p.transfers_started < decoded < p.arrivals


# -- the compiled network loop (engines without a KV cache: the routing and the transfers compiled) ----


def _pair_runs(net: Network, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> list[_Run]:
    """The same run with the routing compiled (checked: the network loop ran once), in Python over
    the same compiled engines, and on reference engines (routing in Python)."""
    from llmqueue.engines.compiled import NetworkLoop

    calls = []
    loop_run = NetworkLoop.run
    monkeypatch.setattr(NetworkLoop, "run", lambda self: calls.append(1) or loop_run(self))
    runs = []
    for engine, compiled_routing in (("auto", True), ("auto", False), ("reference", False)):
        duration = kwargs.get("duration_s")
        run = _Run(net, analyze(net), 3, kwargs.get("max_requests"),  # type: ignore[arg-type]
                   None if duration is None else float(duration) * 1000.0,  # type: ignore[arg-type]
                   kwargs.get("drain_s"), {}, engine, compiled_routing=compiled_routing)  # type: ignore[arg-type]
        run.output = run.result()  # type: ignore[attr-defined]
        runs.append(run)
    assert calls == [1]
    return runs


def _same_pair_runs(runs: list[_Run]) -> None:
    """Compiled and Python routing: byte-identical results; the reference engines: the same pair
    and class figures, every pair visit's and every request's latencies to the bit."""
    docs = [r.output.to_dict() for r in runs]  # type: ignore[attr-defined]
    assert json.dumps(docs[0], sort_keys=True) == json.dumps(docs[1], sort_keys=True)
    assert docs[2]["pairs"] == docs[0]["pairs"] and docs[2]["classes"] == docs[0]["classes"]
    for run in runs[1:]:
        for name, pair in run.pairs.items():
            for a, b in zip(pair.recorder._columns(), runs[0].pairs[name].recorder._columns(), strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b)
        for cname, latency in run.class_latency.items():
            assert latency == runs[0].class_latency[cname]
    for r in runs:
        _conserved(r.output)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("transfer", "kwargs"), [
    ("fixed_ms=2,per_token_ms=0.01,link=shared", {"max_requests": 400}),
    ("fixed_ms=20,per_token_ms=0.05,link=shared", {"duration_s": 6.0, "drain_s": 0.0}),  # cut in flight
    ("fixed_ms=20,per_token_ms=0.05", {"max_requests": 300, "drain_s": 0.05}),
    ("fixed_ms=0", {"max_requests": 300}),  # transfers end at the instant their prompt does
])
def test_the_compiled_loop_runs_pairs_as_the_python_routing(transfer: str, kwargs: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs of compiled engines (no KV cache) run in the compiled network loop: the same run as
    the Python routing (to the byte) and as the reference engines (to the bit, request by request),
    with a shared link or pure delays, cut with transfers in flight or drained."""
    net = parse_network(pair_net(after=True, rate=30.0, decode_memory=None, transfer=transfer))
    runs = _pair_runs(net, monkeypatch, **kwargs)
    _same_pair_runs(runs)
    pair = runs[0].output.pairs["llama"]  # type: ignore[attr-defined]
    assert pair.completed > 0 and pair.transfers_started > 0
    if "duration_s" in kwargs:
        assert pair.in_transfer + pair.in_decode + pair.in_prefill > 0
    assert not any("Python" in note for note in runs[0].output.notes)  # type: ignore[attr-defined]


def test_compiled_pair_visits_without_output_or_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """d = 0, p = 0 and p = d = 0 visits of a pair in the compiled loop: as in Python."""
    net = parse_network(pair_net(decode_memory=None, after=True))
    node = net.classes["c"].nodes["a"]
    zeros = dataclasses.replace(node, prefill=SometimesZero(node.prefill, 0.3),
                                decode=SometimesZero(node.decode, 0.3))
    nodes = {**net.classes["c"].nodes, "a": zeros}
    classes = {"c": dataclasses.replace(net.classes["c"], nodes=nodes)}
    net = Network(net.engines, classes, net.pools, net.pairs)
    runs = _pair_runs(net, monkeypatch, max_requests=300)
    _same_pair_runs(runs)
    p = runs[0].output.pairs["llama"]  # type: ignore[attr-defined]
    assert p.arrivals < 300 and p.transfers_started < p.completed


def test_pair_visits_reach_the_recorders_in_the_folds_of_one_by_one() -> None:
    """The compiled loop hands finished pair visits over in blocks cut where one-by-one
    ``request_done`` folds its columns into histograms: the same sums, to the bit."""
    from llmqueue.engines.compiled import _feed
    from llmqueue.engines.metrics import Recorder, RequestRecord, merged_latency

    rng = np.random.default_rng(1)
    n = 53
    times = np.cumsum(rng.random((n, 3)) * 7.3, axis=1)
    sizes = rng.integers(0, 40, size=(n, 2))
    one, bulk = Recorder(keep_requests=False, exact_limit=7), Recorder(keep_requests=False, exact_limit=7)
    for row, size in zip(times.tolist(), sizes.tolist(), strict=True):
        one.request_done(RequestRecord(0, row[0], row[1], row[2], size[0], size[1]))
    _feed(bulk, times[:20], sizes[:20])
    _feed(bulk, times[20:], sizes[20:])
    assert one.histograms is not None and bulk.histograms is not None
    for name in one.histograms:
        assert one.histograms[name].sum == bulk.histograms[name].sum
        assert np.array_equal(one.histograms[name].counts, bulk.histograms[name].counts)
    one.finish(100.0)
    bulk.finish(100.0)
    assert merged_latency([one]) == merged_latency([bulk])


# -- the theory --------------------------------------------------------------------------------------


def test_pair_loads_split_prompt_and_output_tokens() -> None:
    net = parse_network(pair_net(decode_memory=None))
    a = analyze(net)
    pre, dec = a.engines["pre/0"], a.engines["dec/0"]
    assert pre.prefill_tokens_per_s == pytest.approx(20.0 * 300 / 2) and pre.decode_tokens_per_s == 0
    assert dec.prefill_tokens_per_s == 0 and dec.decode_tokens_per_s == pytest.approx(20.0 * 30 / 3)
    q = a.pairs["llama"]
    assert (q.prefill_rho, q.decode_rho) == (pre.rho, dec.rho)
    assert q.link_rho == pytest.approx(20.0 * 5.0 / 1000)
    assert a.critical_scale == pytest.approx(1 / max(q.prefill_rho, q.decode_rho, q.link_rho))
    cached = analyze(parse_network(pair_net(decode_memory="tokens=2000")))
    # the decode side's KV limit uses the context p + (d + 1) / 2 of decode-only visits
    assert cached.engines["dec/0"].memory_batch_limit == int(
        (125 - 1) * 16 // (300 + 15.5 + 7.5))


def test_an_overloaded_link_is_predicted_unstable() -> None:
    from llmqueue.sim.network import predict_network

    net = parse_network(pair_net(transfer="fixed_ms=100,link=shared", rate=12.0, decode_memory=None))
    a = analyze(net)
    assert a.pairs["llama"].link_rho == pytest.approx(1.2)
    assert predict_network(net, a).verdict == "unstable"
    assert any("shared KV link" in w for w in a.warnings)


# -- the CLI -----------------------------------------------------------------------------------------


def test_cli_pair_rows_and_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "network", "analyze", EXAMPLE)
    assert code == 0 and "pair llama: prefill prefill load" in out
    code, out, _ = run_cli(capsys, "network", "simulate", EXAMPLE, "--requests", "300")
    assert code == 0 and "in P/xfer/D" in out and "p99 TPOT" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(Path(EXAMPLE).read_text().replace("fixed_ms=2,", "fixed_ms=-2,"))
    code, out, err = run_cli(capsys, "network", "analyze", str(bad))
    assert code == 2 and "disaggregated.llama.transfer.fixed_ms" in err and len(err.strip().splitlines()) == 1

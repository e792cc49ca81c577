"""The engine contract: the three engines satisfy what the drivers call, one function chooses
among them, and the fast engine builds on the reference engine only through its public surface."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from llmqueue.engines import compiled
from llmqueue.engines.compiled import KernelEngine
from llmqueue.engines.contract import EngineContract, SteppedEngine, choose_engine
from llmqueue.engines.fast import CompactBatch, FastEngine
from llmqueue.engines.metrics import Recorder, Totals
from llmqueue.engines.reference import BatchPlan, Engine, EngineState
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import ConstantTime
from llmqueue.model.memory import KVCache
from llmqueue.model.network import EngineSpec
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import SARATHI, VLLM
from llmqueue.sim.network import engine_kind

ENGINES = Path(__file__).resolve().parents[1] / "src" / "llmqueue" / "engines"


def _members(protocol: type) -> dict[str, object]:
    """The protocol's own members (methods and properties) and annotated attributes."""
    names: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object,) or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                names[name] = value
        for name in getattr(klass, "__annotations__", {}):
            names.setdefault(name, None)
    return names


def _check_structure(cls: type, protocol: type) -> None:
    """Every member of ``protocol`` exists on ``cls``; methods take the same parameters."""
    for name, member in _members(protocol).items():
        if member is None:  # a data attribute: set in __init__, checked on instances
            continue
        assert hasattr(cls, name) or isinstance(member, property), f"{cls.__name__} lacks {name}"
        if callable(member) and not isinstance(member, property):
            want = list(inspect.signature(member).parameters)
            have = list(inspect.signature(getattr(cls, name)).parameters)
            assert have == want, f"{cls.__name__}.{name}{have} is not {want}"


@pytest.mark.parametrize("cls", [Engine, FastEngine, KernelEngine])
def test_every_engine_has_the_network_contract(cls: type) -> None:
    _check_structure(cls, EngineContract)


@pytest.mark.parametrize("cls", [Engine, FastEngine])
def test_python_engines_have_the_driver_contract(cls: type) -> None:
    _check_structure(cls, SteppedEngine)


def test_engine_instances_satisfy_the_protocols() -> None:
    for cls in (Engine, FastEngine):
        eng = cls(SARATHI, ConstantTime(1.0), 16, recorder=Recorder())
        assert isinstance(eng, EngineContract) and isinstance(eng, SteppedEngine)
    if not compiled.available():
        pytest.skip("numba is not installed")
    kernel = KernelEngine(SARATHI, ConstantTime(1.0), 16, None, Recorder())
    assert isinstance(kernel, EngineContract)
    assert not isinstance(kernel, SteppedEngine)  # single runs use compiled.run, not step()
    from llmqueue.paper.reproduce import rs_network
    from llmqueue.sim.network import network_policy

    net = rs_network(0.9, "max-pressure")
    policy = compiled.PolicyEngine(network_policy(net, "S1"), ConstantTime(1.0), 16, None, Recorder(),
                                   net, {})
    assert isinstance(policy, EngineContract) and not isinstance(policy, SteppedEngine)


def test_reference_engine_plans_a_batch_plan() -> None:
    eng = Engine(SARATHI, ConstantTime(1.0), 16)
    eng.submit(Request(0, 0.0, 20, 3))
    plan = eng.form_plan()
    assert isinstance(plan, BatchPlan)
    assert [(job.id, tokens) for job, tokens in plan.entries] == [(0, 16)]
    assert (plan.prefill_tokens, plan.decode_tokens, plan.tokens) == (16, 0, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.prefill_tokens = 1  # type: ignore[misc]
    assert isinstance(eng.state, EngineState)
    for record in (BatchPlan, CompactBatch):
        assert record.__dataclass_params__.frozen and hasattr(record, "__slots__")  # type: ignore[attr-defined]


def _private_names_of_reference() -> set[str]:
    """Private names the reference module defines: functions, methods, attributes of self."""
    tree = ast.parse((ENGINES / "reference.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.startswith("_"):
            names.add(node.name)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "self" and node.attr.startswith("_")):
            names.add(node.attr)
    return {name for name in names if not name.startswith("__")}


def test_fast_engine_uses_no_private_member_of_the_reference_engine() -> None:
    private = _private_names_of_reference()
    tree = ast.parse((ENGINES / "fast.py").read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    used |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not used & private, sorted(used & private)


def test_totals_are_loaded_field_by_field_from_the_kernel() -> None:
    """The compiled loop fills every ``Totals`` field by name (none left at its default)."""
    source = inspect.getsource(compiled._load_recorder)
    for f in dataclasses.fields(Totals):
        assert f"{f.name}=" in source, f.name


def _spec(**changes: object) -> EngineSpec:
    base = EngineSpec(name="e", budget=64, k_max=None, batch_time=ConstantTime(1.0), policy="sarathi",
                      priority=())
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_one_choice_for_single_runs_and_networks() -> None:
    """``choose_engine`` answers for both drivers; the network's ``engine_kind`` is built on it."""
    numba = compiled.available()
    custom = lambda view: {}  # noqa: E731  (a policy without repeats_plan)
    assert choose_engine("auto", SARATHI, ConstantTime(1.0), 64) == ("compiled" if numba else "fast")
    assert choose_engine("auto", SARATHI, ConstantTime(1.0), 64, keep_batches=True) == "fast"
    assert choose_engine("auto", SARATHI, ConstantTime(1.0), 64, max_concurrency=4) == "fast"
    assert choose_engine("auto", custom, ConstantTime(1.0), 64) == "reference"
    assert choose_engine("reference", SARATHI, ConstantTime(1.0), 64) == "reference"
    assert choose_engine("fast", VLLM, ConstantTime(1.0), 64) == "fast"
    with pytest.raises(ConfigError, match="repeats_plan"):
        choose_engine("fast", custom, ConstantTime(1.0), 64)
    with pytest.raises(ConfigError, match="max_concurrency"):
        choose_engine("compiled", SARATHI, ConstantTime(1.0), 64, max_concurrency=4)
    with pytest.raises(ConfigError, match="must be one of"):
        choose_engine("turbo", SARATHI, ConstantTime(1.0), 64)
    # a network: the fast choice falls back to the reference engine, a KV cache is not compiled
    memory = KVCache(4096)
    assert choose_engine("fast", custom, ConstantTime(1.0), 64, network_engine="e") == "reference"
    assert choose_engine("auto", SARATHI, ConstantTime(1.0), 64, memory=memory, network_engine="e") == "fast"
    with pytest.raises(ConfigError, match="KV cache"):
        choose_engine("compiled", SARATHI, ConstantTime(1.0), 64, memory=memory, network_engine="e")
    assert engine_kind(SARATHI, _spec()) == ("compiled" if numba else "fast")
    assert engine_kind(SARATHI, _spec(memory=memory)) == "fast"

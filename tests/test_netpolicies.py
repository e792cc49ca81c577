"""Class-aware policies for networks: strict non-preemptive class priority and max-pressure.

Both must form legal batches in any engine state (the engine's ``check_plan`` is the judge), and
each must order work exactly as documented: ``ClassPriority`` by (started, rank, arrival),
``MaxPressure`` by the pressure weight of a token, leaving negative-weight buffers unserved.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmqueue import ConstantTime
from llmqueue.engines.fast import needs_reference
from llmqueue.engines.reference import Job, check_plan
from llmqueue.errors import ConfigError
from llmqueue.model.workload import Request
from llmqueue.policies.network import ClassPriority, MaxPressure
from llmqueue.policies.view import EngineView
from llmqueue.sim.run import simulate

CLASSES = ("A.short", "A.long", "B.short", "B.long", "C", "")

# the Rybko–Stolyar network (PAPER §5.4): A does short then long, B likewise; both then leave
RS_ROUTES = {
    "A.short": (("A.long", 1.0),),
    "A.long": (("exit", 1.0),),
    "B.short": (("B.long", 1.0),),
    "B.long": (),
}
RS_SIZES = {"A.short": 64.0, "A.long": 544.0, "B.short": 64.0, "B.long": 544.0}


@dataclass(frozen=True)
class R:
    """A stand-in for a request present in an engine (the ``RequestView`` attributes)."""

    id: int
    prefill_left: int
    decode_left: int = 1
    cls: str = ""
    prefill_tokens: int = -1  # -1: the prompt has not started (= prefill_left)
    decode_tokens: int = 1
    arrival_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill_tokens < 0:
            object.__setattr__(self, "prefill_tokens", self.prefill_left)


def view(
    *requests: R, budget: int = 100, k_max: int | None = None, buffers: dict[str, int] | None = None
) -> EngineView:
    """An engine view holding ``requests`` (in arrival order), split by phase."""
    return EngineView(
        now_ms=0.0,
        budget=budget,
        k_max=k_max,
        prefilling=[r for r in requests if r.prefill_left],
        decoding=[r for r in requests if not r.prefill_left],
        buffers=buffers or {},
    )


# -- both policies: legal plans in any state ---------------------------------------------------

priorities = st.permutations(["A", "B.short", "B.long", "C"]).flatmap(
    lambda order: st.integers(1, len(order)).map(lambda n: ClassPriority(tuple(order[:n])))
)
pressures = st.just(MaxPressure(RS_ROUTES, RS_SIZES))
request_lists = st.lists(
    st.tuples(st.sampled_from(CLASSES), st.integers(0, 40), st.integers(1, 6), st.floats(0.0, 3.0)),
    min_size=1,
    max_size=25,
)


@given(
    policy=priorities | pressures,
    sizes=request_lists,
    budget=st.integers(1, 48),
    k_max=st.none() | st.integers(1, 5),
)
def test_runs_obey_the_batch_rules_and_complete(policy, sizes, budget, k_max) -> None:
    requests, t = [], 0.0
    for i, (cls, p, d, gap) in enumerate(sizes):
        t += gap
        requests.append(Request(i, t, p, d, cls=cls))
    result = simulate(
        requests, policy, ConstantTime(1.0), budget, k_max=k_max, engine="reference", keep_batches=True
    )
    # the engine checked every plan; a single engine has no buffer counts, so max-pressure's
    # weights are all 0 and it serves everything too
    assert result.metrics.completed == len(requests)
    if k_max is None:
        assert result.metrics.wc_violations == 0
    for batch in result.batches or ():
        assert batch.tokens <= budget
        assert len(batch.plan) <= (k_max or len(requests))


@st.composite
def engine_states(draw) -> tuple[EngineView, dict[int, Job]]:
    """A random engine state (prompts partly done, decoders part-way) with random buffer counts."""
    jobs: dict[int, Job] = {}
    for i, (cls, p, d, _) in enumerate(draw(request_lists)):
        job = Job(Request(i, float(i), p, d, cls=cls), i)
        job.prefill_left = draw(st.integers(0, p))
        if not job.prefill_left:
            job.decode_left = draw(st.integers(1, d))
        jobs[i] = job
    buffers = draw(st.dictionaries(st.sampled_from(CLASSES), st.integers(0, 60)))
    state = EngineView(
        now_ms=0.0,
        budget=draw(st.integers(1, 48)),
        k_max=draw(st.none() | st.integers(1, 5)),
        prefilling=[j for j in jobs.values() if j.prefill_left],
        decoding=[j for j in jobs.values() if not j.prefill_left],
        buffers=buffers,
    )
    return state, jobs


@given(policy=priorities | pressures, state=engine_states())
def test_plans_pass_check_plan_in_any_state(policy, state) -> None:
    v, jobs = state
    plan = policy(v)
    check_plan(plan, v, jobs)  # raises PlanError on any broken rule
    if isinstance(policy, MaxPressure):
        weights = {rid: policy.weight(jobs[rid].cls, v.buffers) for rid in jobs}
        assert all(weights[rid] >= 0 for rid in plan)
        # greedy by weight: nothing left out outweighs something served
        if plan:
            served = min(weights[rid] for rid in plan)
            assert all(w <= served for rid, w in weights.items() if rid not in plan)
    else:  # work-conserving without k_max, as declared
        if v.k_max is None:
            assert sum(plan.values()) == min(v.budget, v.demand_tokens)


def test_declared_attributes_and_engine_choice() -> None:
    for policy in (ClassPriority(("A",)), MaxPressure(RS_ROUTES, RS_SIZES)):
        assert policy.chunks_prefill is True
        assert needs_reference(policy)  # no repeats_plan / plan_compact: the reference engine
        result = simulate([Request(0, 0.0, 5, 2, cls="A.short")], policy, ConstantTime(1.0), 4)
        assert result.metrics.completed == 1
    assert ClassPriority(("A",)).work_conserving is True
    assert MaxPressure(RS_ROUTES, RS_SIZES).work_conserving is False
    assert ClassPriority(("A",)).name == "priority"
    assert MaxPressure({}, {}).name == "max-pressure"


# -- ClassPriority ------------------------------------------------------------------------------


def test_rank_matches_exact_names_and_class_prefixes() -> None:
    policy = ClassPriority(("A.long", "B", "A"))
    assert policy.rank("A.long") == 0
    assert policy.rank("B.short") == 1
    assert policy.rank("A.short") == 2
    assert policy.rank("AB.short") == 3  # "A" is not a prefix of class "AB"
    assert policy.rank("") == 3


def test_high_priority_waiting_prompt_goes_before_an_older_low_one() -> None:
    policy = ClassPriority(("A", "B"))
    plan = policy(view(R(0, 10, cls="B.long", arrival_ms=0.0), R(1, 10, cls="A.short", arrival_ms=1.0),
                       budget=4))
    assert plan == {1: 4}
    # through the engine: both arrive during the first batch; the next one serves A first
    requests = [
        Request(0, 0.0, 4, 1, cls="C"),
        Request(1, 0.2, 4, 1, cls="B.long"),
        Request(2, 0.4, 4, 1, cls="A.short"),
    ]
    result = simulate(requests, policy, ConstantTime(1.0), 4, engine="reference", keep_batches=True)
    assert result.batches is not None
    assert result.batches[1].plan == ((0, 1), (2, 3))  # decoder first, then A ahead of older B


def test_started_low_priority_prompt_is_not_preempted() -> None:
    policy = ClassPriority(("A", "B"))
    requests = [Request(0, 0.0, 10, 1, cls="B.long"), Request(1, 0.5, 10, 1, cls="A.short")]
    result = simulate(requests, policy, ConstantTime(1.0), 4, engine="reference", keep_batches=True)
    assert result.batches is not None
    plans = [b.plan for b in result.batches[:3]]
    assert plans == [((0, 4),), ((0, 4),), ((0, 2), (1, 2))]
    # started prompts among themselves go by rank, and all of them before waiting prompts
    plan = policy(view(
        R(0, 5, cls="A.x"),
        R(1, 3, cls="B.x", prefill_tokens=8),
        R(2, 3, cls="A.x", prefill_tokens=8),
        budget=7,
    ))
    assert list(plan.items()) == [(2, 3), (1, 3), (0, 1)]


def test_decoders_come_first_by_rank_when_the_budget_binds() -> None:
    policy = ClassPriority(("A", "B"))
    state = (R(0, 0, cls="B.short"), R(1, 0, cls="other"), R(2, 0, cls="A.long"), R(3, 5, cls="A.short"))
    assert list(policy(view(*state, budget=2)).items()) == [(2, 1), (0, 1)]
    assert list(policy(view(*state, budget=3)).items()) == [(2, 1), (0, 1), (1, 1)]
    assert list(policy(view(*state, budget=6)).items()) == [(2, 1), (0, 1), (1, 1), (3, 3)]


def test_priority_respects_k_max() -> None:
    policy = ClassPriority(("A",))
    state = (R(0, 0, cls="B"), R(1, 9, cls="A"), R(2, 0, cls="A"))
    assert policy(view(*state, budget=50, k_max=2)) == {2: 1, 0: 1}
    assert policy(view(*state, budget=50, k_max=3)) == {2: 1, 0: 1, 1: 9}


@pytest.mark.parametrize("order", [(), ("A", "A"), ("",), "A", (1,), None])
def test_bad_order_is_refused(order) -> None:
    with pytest.raises(ConfigError) as err:
        ClassPriority(order)
    assert err.value.field == "order"


def test_order_given_as_a_list_is_kept_as_a_tuple() -> None:
    assert ClassPriority(["A", "B"]).order == ("A", "B")  # type: ignore[arg-type]


# -- MaxPressure --------------------------------------------------------------------------------


def test_weights_follow_the_pressure_formula() -> None:
    policy = MaxPressure(RS_ROUTES, RS_SIZES)
    buffers = {"A.short": 10, "A.long": 50, "B.long": 3}
    assert policy.weight("A.short", buffers) == pytest.approx((10 - 50) / 64)
    assert policy.weight("B.long", buffers) == pytest.approx(3 / 544)
    assert policy.weight("A.long", buffers) == pytest.approx(50 / 544)  # "exit" counts 0
    assert policy.weight("B.short", buffers) == pytest.approx(-3 / 64)  # 0 - 1 * N(B.long)
    assert policy.weight("B.short", {"B.short": 5, "B.long": 3}) == pytest.approx(2 / 64)
    assert policy.weight("unknown", buffers) == 0.0  # not in sizes: weight 0


def test_negative_weight_is_not_served_and_positive_is() -> None:
    policy = MaxPressure(RS_ROUTES, RS_SIZES)
    buffers = {"A.short": 10, "A.long": 50, "B.long": 3}
    state = (R(0, 0, cls="A.short"), R(1, 20, cls="A.short"), R(2, 30, cls="B.long"), R(3, 0, cls="B.long"))
    assert policy(view(*state, budget=100, buffers=buffers)) == {3: 1, 2: 30}
    # only negative-weight work present: the engine idles (no batch)
    assert policy(view(*state[:2], budget=100, buffers=buffers)) == {}


def test_higher_weight_fills_the_budget_first() -> None:
    policy = MaxPressure(RS_ROUTES, RS_SIZES)
    buffers = {"A.long": 50, "B.long": 3}  # A.long weighs 50/544, B.long 3/544
    state = (R(0, 30, cls="B.long"), R(1, 0, cls="B.long"), R(2, 30, cls="A.long"))
    assert list(policy(view(*state, budget=32, buffers=buffers)).items()) == [(2, 30), (1, 1), (0, 1)]


def test_zero_weight_is_served_after_positive_weight() -> None:
    policy = MaxPressure(RS_ROUTES, RS_SIZES)
    buffers = {"A.short": 4, "A.long": 4, "B.long": 2}  # A.short: 4 - 4 = 0
    state = (R(0, 5, cls="A.short"), R(1, 0, cls="not-a-buffer"), R(2, 5, cls="B.long"))
    assert list(policy(view(*state, budget=8, buffers=buffers)).items()) == [(2, 5), (1, 1), (0, 2)]


def test_rounding_does_not_make_a_balanced_buffer_negative() -> None:
    routes = {"X": tuple((f"Y{i}", 0.1) for i in range(10))}
    policy = MaxPressure(routes, {"X": 10.0})
    buffers = {"X": 3, **{f"Y{i}": 3 for i in range(10)}}
    assert policy.weight("X", buffers) == 0.0
    assert policy(view(R(0, 4, cls="X"), buffers=buffers)) == {0: 4}


def test_ties_go_decoders_then_started_prompts_then_arrival_order() -> None:
    policy = MaxPressure(RS_ROUTES, RS_SIZES)
    state = (
        R(0, 6, cls="A.short", arrival_ms=0.0),  # waiting prompt
        R(1, 6, cls="A.short", arrival_ms=1.0),  # waiting prompt
        R(2, 5, cls="A.short", prefill_tokens=9, arrival_ms=2.0),  # started prompt
        R(3, 0, cls="A.short", arrival_ms=3.0),  # decoding
        R(4, 0, cls="A.short", arrival_ms=4.0),  # decoding
    )
    assert list(policy(view(*state, budget=10)).items()) == [(3, 1), (4, 1), (2, 5), (0, 3)]
    assert list(policy(view(*state, budget=20)).items()) == [(3, 1), (4, 1), (2, 5), (0, 6), (1, 6)]


def test_pressure_respects_budget_and_k_max() -> None:
    policy = MaxPressure(RS_ROUTES, RS_SIZES)
    buffers = {"A.long": 5, "B.long": 1}
    state = (R(0, 0, cls="A.long"), R(1, 0, cls="A.long"), R(2, 40, cls="B.long"))
    assert policy(view(*state, budget=1, buffers=buffers)) == {0: 1}
    assert policy(view(*state, budget=50, k_max=2, buffers=buffers)) == {0: 1, 1: 1}
    assert policy(view(*state, budget=50, k_max=3, buffers=buffers)) == {0: 1, 1: 1, 2: 40}
    assert policy(view(*state, budget=10, k_max=3, buffers=buffers)) == {0: 1, 1: 1, 2: 8}


@pytest.mark.parametrize(
    ("routes", "sizes", "field"),
    [
        ({"A": (("B", float("nan")),)}, {"A": 1.0}, "routes"),
        ({"A": (("B", -0.5), ("C", 1.5))}, {"A": 1.0}, "routes"),
        ({"A": (("B", float("inf")),)}, {"A": 1.0}, "routes"),
        ({"A": ((3, 1.0),)}, {"A": 1.0}, "routes"),
        ({"A": (("B",),)}, {"A": 1.0}, "routes"),
        ({"A": 5}, {"A": 1.0}, "routes"),
        ({"A": (("B", "1"),)}, {"A": 1.0}, "routes"),
        ([("A", "B")], {"A": 1.0}, "routes"),
        ({}, {"A": 0.0}, "sizes"),
        ({}, {"A": -3.0}, "sizes"),
        ({}, {"A": float("inf")}, "sizes"),
        ({}, {"A": float("nan")}, "sizes"),
        ({}, {"A": True}, "sizes"),
        ({}, {"A": "64"}, "sizes"),
        ({}, [("A", 1.0)], "sizes"),
    ],
)
def test_bad_routes_or_sizes_are_refused(routes, sizes, field) -> None:
    with pytest.raises(ConfigError) as err:
        MaxPressure(routes, sizes)
    assert err.value.field == field
    assert "\n" not in str(err.value)


def test_constructor_copies_its_mappings() -> None:
    routes = {"A.short": [("A.long", 1.0)]}
    sizes = {"A.short": 64.0}
    policy = MaxPressure(routes, sizes)  # type: ignore[arg-type]
    routes["A.short"] = [("A.long", 7.0)]
    sizes["A.short"] = -1.0
    assert policy.routes == {"A.short": (("A.long", 1.0),)}
    assert policy.sizes == {"A.short": 64.0}

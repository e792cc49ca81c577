"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import FASTERTRANSFORMER, KFCFS, ORCA, SARATHI, VLLM, VLLM_CHUNKED

SHIPPED = [FASTERTRANSFORMER, VLLM, ORCA, SARATHI, VLLM_CHUNKED]

policies = st.one_of(
    st.sampled_from(SHIPPED),
    st.builds(
        KFCFS,
        priority=st.sampled_from(["prefill", "decode"]),
        mixed=st.booleans(),
        chunked=st.booleans(),
        k_p=st.none() | st.integers(1, 4),
        k_d=st.none() | st.integers(1, 6),
    ),
)
"""The shipped policies and random (K_p, K_d)-FCFS knobs."""


@st.composite
def workloads(draw: st.DrawFn, prefill_min: int = 1, decode_min: int = 1) -> list[Request]:
    """Up to 40 requests with bursts (zero gaps) and gaps that fall on and off batch boundaries.

    ``prefill_min=0`` allows prompt-less requests (their decode is then at least 1);
    ``decode_min=0`` allows prompt-only requests.
    """
    n = draw(st.integers(1, 40))
    t = 0.0
    out = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 7.25, 40.0]))
        prefill = draw(st.integers(prefill_min, 90))
        decode = draw(st.integers(decode_min if prefill else 1, 60))
        out.append(Request(i, t, prefill, decode))
    return out

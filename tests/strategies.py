"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from llmqueue.policies import FASTERTRANSFORMER, KFCFS, ORCA, SARATHI, VLLM, VLLM_CHUNKED

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

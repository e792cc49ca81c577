"""Engines that run a policy on a workload: the reference engine, the fast engine, the compiled loop,
and what they record.
"""

"""Schedulers as pure functions: the read-only view and plan types, the FCFS family, network policies."""

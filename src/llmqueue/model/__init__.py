"""What is simulated: requests, size distributions, arrivals, workloads, traces, batch-time models,
KV memory, networks.
"""

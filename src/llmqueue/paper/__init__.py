"""The paper's experiments reproduced: each as experiment, claims and report."""

TARGETS = ("fig1", "example", "theorem", "vertex-c", "rs")
"""The reproducible targets (``llmqueue.paper.reproduce.reproduce`` also takes ``all``); here so
that the command line lists them without loading the experiments."""

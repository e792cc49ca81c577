"""What can be known without simulating: capacity, the batch-size-limit region, predicted and
observed stability verdicts, network analysis.
"""

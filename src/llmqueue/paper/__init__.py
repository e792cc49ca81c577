"""The paper's experiments reproduced: each as experiment, claims and report."""

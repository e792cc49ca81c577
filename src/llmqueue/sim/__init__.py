"""Runs: one engine on a workload, networks of engines, and the settings that resolve a run's inputs."""

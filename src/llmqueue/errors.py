"""Typed exceptions: every bad input becomes one clear line naming the field and the value."""

from __future__ import annotations


class LLMQueueError(Exception):
    """Base class of every error llmqueue raises on purpose."""


class ConfigError(LLMQueueError, ValueError):
    """A parameter, spec string or input file is invalid.

    The message is one line: ``field: problem (got value)``.
    """

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}: {problem} (got {value!r})")


class PlanError(LLMQueueError):
    """A policy returned a batch plan that breaks a batch rule; ``rule`` names the rule."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"batch rule '{rule}' broken: {detail}")

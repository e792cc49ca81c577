"""Decoder shapes from a Hugging Face ``config.json``: the dimensions a batch-time profile builds.

A shape is read from a ``config.json`` path or by the name of a shipped config (package data in
``llmqueue/model/hfconfigs``, the public model cards' dimensions): ``tiny`` (a small decoder for
a CPU run in seconds), ``llama3-8b``, ``llama3-70b``, ``codellama-34b`` and ``mixtral-8x7b`` (a
mixture of experts). Only shapes are read, never weights. :meth:`DecoderShape.sharded` gives one
GPU's shapes under tensor parallelism (heads, KV heads, MLP width and vocabulary divided by
``tp``); :meth:`DecoderShape.parameters` counts parameters (the shipped configs give the published
sizes). No torch here: :mod:`llmqueue.studies.gpuprofile` builds and times the layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llmqueue.errors import ConfigError

__all__ = ["MAX_TP", "DecoderShape", "load_shape", "shape_from_config", "shipped_names"]

MAX_TP = 1024
"""Largest tensor-parallel degree accepted."""
_MAX_DIM = 10**7
"""Largest single dimension accepted (no real model is near it; keeps products finite)."""
_SHIPPED = "hfconfigs"
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True, slots=True)
class DecoderShape:
    """A Llama-architecture decoder's dimensions (one GPU's share when ``tp`` > 1).

    ``experts`` is 1 for a dense SwiGLU MLP; a mixture of experts routes each token to
    ``experts_per_token`` of ``experts`` SwiGLU MLPs of width ``intermediate``. ``tp`` is the
    tensor-parallel degree the shape was sharded by (1: the whole model).
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 1
    experts_per_token: int = 1
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    tp: int = 1
    source: str = ""

    @property
    def moe(self) -> bool:
        """Whether the MLP is a mixture of experts."""
        return self.experts > 1

    @property
    def query_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.heads // self.kv_heads

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: QKV, output projection, MLP (router too), two norms."""
        attention = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        attention += self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate * self.experts
        router = self.hidden * self.experts if self.moe else 0
        return attention + mlp + router + 2 * self.hidden

    def parameters(self) -> int:
        """All parameters: embedding, layers, final norm and LM head (one copy if tied)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * self.layer_parameters() + self.hidden

    def sharded(self, tp: int) -> DecoderShape:
        """One GPU's shapes at tensor-parallel degree ``tp`` (Megatron-style split, no all-reduce).

        Query heads, MLP width and vocabulary are divided by ``tp``; KV heads too, or replicated
        (one per GPU) when ``tp`` exceeds them, as vLLM does. ConfigError when ``tp`` does not divide
        the heads or the MLP width, or the KV heads neither divide nor are divided by it.
        """
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
            raise ConfigError("tp", tp, f"must be an integer in [1, {MAX_TP}]")
        if self.tp != 1:
            raise ConfigError("tp", tp, f"{self.name} is already sharded (tp={self.tp})")
        if tp == 1:
            return self
        if self.heads % tp:
            raise ConfigError("tp", tp, f"must divide the {self.heads} attention heads of {self.name}")
        if self.kv_heads % tp and tp % self.kv_heads:
            raise ConfigError(
                "tp", tp, f"must divide, or be a multiple of, the {self.kv_heads} KV heads of {self.name}"
            )
        if self.intermediate % tp:
            raise ConfigError("tp", tp, f"must divide the MLP width {self.intermediate} of {self.name}")
        return dataclasses.replace(
            self,
            heads=self.heads // tp,
            kv_heads=max(self.kv_heads // tp, 1),
            intermediate=self.intermediate // tp,
            vocab=math.ceil(self.vocab / tp),
            tp=tp,
        )

    def memory_spec(self, tp: int = 1) -> str:
        """The model part of ``--memory gpu_gib=..,...`` for this (whole, unsharded) model."""
        return (
            f"params_b={self.parameters() / 1e9:.4g},layers={self.layers},kv_heads={self.kv_heads},"
            f"head_dim={self.head_dim}" + (f",tp={tp}" if tp > 1 else "")
        )

    def describe(self) -> str:
        """One line: the dimensions, for a report."""
        moe = f", {self.experts} experts top-{self.experts_per_token}" if self.moe else ""
        tp = f" (one GPU of tp={self.tp})" if self.tp > 1 else ""
        return (
            f"{self.name}{tp}: hidden {self.hidden}, {self.layers} layers, {self.heads} heads, "
            f"{self.kv_heads} KV heads, head dim {self.head_dim}, MLP {self.intermediate}{moe}, "
            f"vocab {self.vocab}, {_count(self.parameters())} parameters"
        )


def _count(parameters: int) -> str:
    """A parameter count in words: ``8.03 B`` or ``3.77 M``."""
    return f"{parameters / 1e9:.2f} B" if parameters >= 10**8 else f"{parameters / 1e6:.2f} M"


def shipped_names() -> list[str]:
    """Names of the shipped configs (``llmqueue/model/hfconfigs/*.json``), sorted."""
    folder = resources.files("llmqueue.model").joinpath(_SHIPPED)
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def _dim(config: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    """``config[key]`` as a positive integer (``default`` when absent or null, if given)."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ConfigError(key, None, f"missing from {where}")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ConfigError(key, value, f"must be a positive integer ({where})")
    if not 1 <= value <= _MAX_DIM:
        raise ConfigError(key, value, f"must be a positive integer <= {_MAX_DIM} ({where})")
    return int(value)


def _real(config: Mapping[str, Any], key: str, where: str, default: float) -> float:
    """``config[key]`` as a positive finite number (``default`` when absent or null)."""
    value = config.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(key, value, f"must be a positive number ({where})")
    return float(value)


def shape_from_config(config: Mapping[str, Any], name: str, where: str = "config.json") -> DecoderShape:
    """A :class:`DecoderShape` from the keys of a Hugging Face Llama/Mistral/Mixtral ``config.json``.

    Needs ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size`` and
    ``vocab_size``; ``num_key_value_heads`` defaults to the heads, ``head_dim`` to hidden / heads,
    ``num_local_experts`` (or ``num_experts``) to 1 and ``num_experts_per_tok`` to 1 (2 with
    experts). ConfigError naming the key: a missing key, a dimension that is not a positive integer,
    heads that do not divide the hidden size, KV heads that do not divide the heads.
    """
    if not isinstance(config, Mapping):
        raise ConfigError("model", where, "config.json must hold a JSON object")
    for key in _REQUIRED:
        if config.get(key) is None:
            raise ConfigError(key, None, f"missing from {where}")
    hidden = _dim(config, "hidden_size", where)
    heads = _dim(config, "num_attention_heads", where)
    if hidden % heads:
        raise ConfigError("num_attention_heads", heads, f"must divide hidden_size {hidden} ({where})")
    kv_heads = _dim(config, "num_key_value_heads", where, heads)
    if heads % kv_heads:
        raise ConfigError(
            "num_key_value_heads", kv_heads, f"must divide num_attention_heads {heads} ({where})"
        )
    expert_key = "num_local_experts" if config.get("num_local_experts") is not None else "num_experts"
    experts = _dim(config, expert_key, where, 1)
    per_token = _dim(config, "num_experts_per_tok", where, 2 if experts > 1 else 1)
    if per_token > experts:
        raise ConfigError(
            "num_experts_per_tok", per_token, f"must be at most the {experts} experts ({where})"
        )
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConfigError("tie_word_embeddings", tied, f"must be true or false ({where})")
    return DecoderShape(
        name=name,
        hidden=hidden,
        layers=_dim(config, "num_hidden_layers", where),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=_dim(config, "head_dim", where, hidden // heads),
        intermediate=_dim(config, "intermediate_size", where),
        vocab=_dim(config, "vocab_size", where),
        experts=experts,
        experts_per_token=per_token if experts > 1 else 1,
        rope_theta=_real(config, "rope_theta", where, 10000.0),
        rms_eps=_real(config, "rms_norm_eps", where, 1e-5),
        tied_embeddings=tied,
        source=where,
    )


def load_shape(model: str) -> DecoderShape:
    """The shape of a shipped config by name (``llama3-8b``) or of a ``config.json`` at a path.

    A path's model is named after its folder (``.../Meta-Llama-3-8B/config.json`` ->
    ``Meta-Llama-3-8B``) or, for any other file name, the file's stem. ConfigError on ``model``
    for an unknown name (the shipped ones listed), an unreadable file, or text that is not JSON.
    """
    text = model.strip()
    names = shipped_names()
    if text in names:
        resource = resources.files("llmqueue.model").joinpath(_SHIPPED, f"{text}.json")
        return shape_from_config(
            json.loads(resource.read_text(encoding="utf-8")), text, f"shipped config {text}"
        )
    path = Path(text)
    if not path.is_file():
        raise ConfigError(
            "model", model, f"neither a shipped config ({', '.join(names)}) nor a config.json file"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("model", model, f"config file cannot be read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("model", model, "config file is not UTF-8 text") from None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(
            "model", model, f"not JSON: line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return shape_from_config(config, name or "model", str(path))

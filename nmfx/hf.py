"""Hugging Face models for the CLI: load a ``save_pretrained`` directory or a config file.

Kept apart from ``nmfx.cli`` so that ``transformers`` (an optional extra, ``nmfx[hf]``) is
imported only when a command names an HF model. Nothing is downloaded: directories are
read with ``local_files_only`` and configs build randomly initialised models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HFInputError", "load_hf_config", "load_hf_dir", "token_inputs"]


class HFInputError(ValueError):
    """A bad ``--hf`` / ``--hf-config`` argument (the CLI turns it into a usage error)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "Hugging Face models need transformers: pip install 'nmfx[hf]'"
        ) from exc
    return transformers


def _model_class(tf: Any, config: Any) -> Any:
    """The class named by ``config.architectures``, else the causal-LM auto class, else the
    bare model: the head the checkpoint was saved with."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    for auto in (tf.AutoModelForCausalLM, tf.AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    raise HFInputError(
        f"no transformers model class for config type {type(config).__name__}; "
        f"set 'architectures' in the config"
    )


def load_hf_dir(path: str) -> nn.Module:
    """The model saved in ``path`` by ``save_pretrained``, in eval mode."""
    where = Path(path)
    if not where.is_dir():
        raise HFInputError(
            f"--hf {path}: no such directory; give a folder written by save_pretrained"
        )
    if not (where / "config.json").is_file():
        raise HFInputError(
            f"--hf {path}: no config.json in it; give a folder written by save_pretrained "
            f"(or a config with --hf-config)"
        )
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(where, local_files_only=True)
    cls = _model_class(tf, config)
    return cls.from_pretrained(where, local_files_only=True).eval()


def load_hf_config(path: str) -> nn.Module:
    """A randomly initialised model built from the config file ``path`` (or the
    ``config.json`` in the folder ``path``), in eval mode."""
    where = Path(path)
    if where.is_dir():
        where = where / "config.json"
    if not where.is_file():
        raise HFInputError(f"--hf-config {path}: no such file; give a transformers config.json")
    try:
        fields = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFInputError(f"--hf-config {path}: not a JSON file ({exc})") from exc
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise HFInputError(
            f"--hf-config {path}: no 'model_type' in it; a transformers config.json names "
            f"one, e.g. \"model_type\": \"llama\""
        )
    tf = _transformers()
    try:
        config = tf.AutoConfig.for_model(**fields)
    except ValueError as exc:
        raise HFInputError(f"--hf-config {path}: {exc}") from exc
    cls = _model_class(tf, config)
    make = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    return make(config).eval()


def token_inputs(model: nn.Module, batch: int, seq: int | None) -> tuple[torch.Tensor, ...] | None:
    """Random token ids ``(batch, seq)`` (32 tokens by default) for a text model, None for
    other models (they need ``--input-shape``)."""
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) != "input_ids" or config is None:
        return None
    seq = seq or 32
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq > limit:
        raise HFInputError(
            f"--seq {seq} is longer than the model's max_position_embeddings={limit}; "
            f"pass --seq {limit} or less"
        )
    vocab = int(getattr(config, "vocab_size", 2))
    return (torch.randint(0, vocab, (batch, seq)),)

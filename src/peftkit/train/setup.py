"""The model side of a run: new special tokens, the method (fresh or from an existing adapter),
and memory options.

Example:
    >>> added = add_special_tokens(model, tokenizer, ["<ans>"])
    >>> adapted = prepare_model(cfg, model, resized=bool(added))
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from torch import nn

from ..adapters import AdaptedModel
from ..config import RunConfig
from ..errors import ConfigError
from ..methods.registry import get_method

log = logging.getLogger(__name__)
ADAPTER_NAME = "default"


def add_special_tokens(model: nn.Module, tokenizer: Any, tokens: Sequence[str]) -> list[str]:
    """Add `tokens` to the tokenizer and grow the embeddings (and an untied head) to match."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if not new:
        return []
    tokenizer.add_tokens(new, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    log.info("added %d special token(s) %s; embeddings resized to %d rows", len(new), new, len(tokenizer))
    return new


def embedding_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the input embedding and output head (e.g. `embed_tokens`, `lm_head`)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [path.rsplit(".", 1)[-1] for path, module in model.named_modules() if any(module is w for w in wanted if w is not None)]


def method_config(cfg: RunConfig, model: nn.Module, resized: bool) -> Any:
    """The method's config; after adding tokens, the embedding and head train and save with the adapter."""
    section = get_method(cfg.method).section
    if section is None:
        raise ConfigError(f"method {cfg.method!r} attaches no adapter")
    config = getattr(cfg, section)
    if not resized:
        return config
    if not hasattr(config, "modules_to_save"):
        raise ConfigError(
            f"data.add_special_tokens needs the embeddings saved with the adapter; method {cfg.method!r} cannot "
            "(use lora or full)"
        )
    extra = [n for n in embedding_module_names(model) if n not in config.modules_to_save]
    return dataclasses.replace(config, modules_to_save=[*config.modules_to_save, *extra])


def prepare_model(cfg: RunConfig, model: nn.Module, resized: bool = False) -> AdaptedModel:
    """Wrap the base, let the method prepare it (QLoRA quantizes, full unfreezes) and attach the adapter:
    fresh, or continued from `train.init_adapter`."""
    method = get_method(cfg.method)
    adapted = AdaptedModel(model)
    if method.prepare_base is not None:
        method.prepare_base(model, cfg)
    if method.section is None:
        return adapted
    if cfg.train.init_adapter:
        adapted.load_adapter(cfg.train.init_adapter, name=ADAPTER_NAME)
        log.info("continuing from the adapter in %s", cfg.train.init_adapter)
        return adapted
    adapted.add_adapter(ADAPTER_NAME, method_config(cfg, model, resized))
    return adapted


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward. With frozen embeddings the checkpointed blocks would see
    inputs that need no grad and drop the adapters' gradients; making the embedding output require
    grad keeps them."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()

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

log = logging.getLogger(__name__)
ADAPTER_NAME = "default"
METHOD_SECTION = {"qlora": "lora"}  # QLoRA is LoRA on a quantized base: it reads the `lora:` section


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
    config = getattr(cfg, METHOD_SECTION.get(cfg.method, cfg.method))
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
    """Wrap the base and attach the method: fresh, or continued from `train.init_adapter`."""
    from ..methods import get_method

    adapted = AdaptedModel(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return adapted
    if cfg.method == "qlora":
        from ..methods.quant import quantize_base

        quantize_base(model, cfg.quant, next(model.parameters()).device)
    if cfg.train.init_adapter:
        adapted.load_adapter(cfg.train.init_adapter, name=ADAPTER_NAME)
        log.info("continuing from the adapter in %s", cfg.train.init_adapter)
        return adapted
    get_method(METHOD_SECTION.get(cfg.method, cfg.method))  # a clear error for a method this install does not have
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

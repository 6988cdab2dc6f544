"""Prefix tuning: N trainable key/value vectors in front of the attention of every layer (Li & Liang, 2021).

The prefix reaches the attention through the key/value cache, as in PEFT 0.21: while the adapter is
active, `adapt_inputs` passes `past_key_values` = a DynamicCache pre-filled with the prefix and
widens the attention mask by N ones, so real tokens sit at positions N.. after it. The tensors live
on a wrapper around the input embedding (the model's entry point; its forward is unchanged).

File format: PEFT's PREFIX_TUNING without projection: `prompt_embeddings` of shape
(N, num_layers * 2 * token_dim), each row laid out (layer, key|value, kv_head, head_dim).
Decoder-only models only: PEFT 0.21's encoder-decoder layout hands every decoder layer the first
layer's prefix (num_transformer_submodules 2), so a faithful T5 prefix has no PEFT equivalent.

Example:
    >>> adapted = attach(model, PrefixTuningConfig(num_virtual_tokens=20))   # init: the keys/values of init_text
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import AdapterError, ConfigError
from ..inject import wrap_module
from .base import AdapterLayerMixin, Capabilities, Method
from .prompt_tuning import (
    from_file_state,
    input_embedding_path,
    prepend_ones,
    prompt_learning_keys,
    require_token_inputs,
    text_token_ids,
    to_file_state,
)


@dataclass
class PrefixTuningConfig:
    """Prefix tuning: N trainable key/value vectors prepended in the attention of every layer (decoder-only models)."""

    num_virtual_tokens: int = 20
    """Prefix length N; trainable parameters: N * layers * 2 * key/value width."""
    init: Literal["text", "random"] = "text"
    """Start from the keys/values the base model computes for `init_text` (so a fresh prefix reads as that text),
    or from random N(0, 1) vectors (PEFT's default)."""
    init_text: str = "Summarize the outcome of this paper"
    """Text whose keys/values initialise the prefix (with `init: text`)."""
    tokenizer: str | None = None
    """Tokenizer for `init_text` (a folder or Hub id); null: the base model's own."""


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder-only model (grouped-query attention aware)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def prefix_cache(prefix: torch.Tensor, batch: int, shape: tuple[int, int, int], dtype: torch.dtype) -> DynamicCache:
    """(N, L * 2 * H * hd) -> a DynamicCache holding, per layer, keys and values of shape (B, H, N, hd)."""
    layers, kv_heads, head_dim = shape
    kv = prefix.to(dtype).view(prefix.shape[0], layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, N, hd)
    return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


class PrefixEmbedding(nn.Module, AdapterLayerMixin):
    """The input embedding with named key/value prefixes beside it (each (N, L * 2 * H * hd), fp32)."""

    adapter_attrs = ("prefix_embeddings",)
    merge_refusal = "a prefix adds attended key/value positions; there is no weight to fold it into"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prefix_embeddings = nn.ParameterDict()
        self.kv_shapes: dict[str, tuple[int, int, int]] = {}
        self._init_adapter_state()

    def add_adapter(self, name: str, prefix: torch.Tensor, shape: tuple[int, int, int]) -> None:
        device = self.base_layer.weight.device
        self.prefix_embeddings[name] = nn.Parameter(prefix.detach().to(device, torch.float32).clone())
        self.kv_shapes[name] = shape

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.kv_shapes.pop(name, None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(input_ids)

    def adapt_inputs(self, model: nn.Module, inputs: dict[str, Any], generating: bool) -> tuple[dict[str, Any], int]:
        """Add the prefix as `past_key_values`; the mask gains N ones, position_ids shift by N."""
        if inputs.get("past_key_values") is not None:
            raise AdapterError("prefix tuning supplies past_key_values itself; run the full sequence without a cache")
        if model.training and getattr(model, "is_activation_checkpointing", False):
            raise AdapterError("prefix tuning does not work with gradient checkpointing (the cache would grow twice)")
        name = self.active_adapter
        prefix = self.prefix_embeddings[name]
        source = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        inputs["past_key_values"] = prefix_cache(prefix, source.shape[0], self.kv_shapes[name], self.base_layer.weight.dtype)
        if inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = prepend_ones(inputs["attention_mask"], prefix.shape[0])
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + prefix.shape[0]
        return inputs, 0

    def extra_repr(self) -> str:
        sizes = {n: tuple(p.shape) for n, p in self.prefix_embeddings.items()}
        return f"prefixes={sizes}, active={self.active_adapter!r}"


@torch.no_grad()
def text_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys/values the base computes for `ids` (N,), as (N, L * 2 * H * hd): a fresh prefix reads as that text."""
    was_training = model.training
    model.eval()
    try:
        cache = model(input_ids=ids[None], use_cache=True).past_key_values
    finally:
        model.train(was_training)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # (L, 2, H, N, hd)
    return kv.permute(3, 0, 1, 2, 4).reshape(ids.shape[0], -1).float()


def attach(model: nn.Module, name: str, config: PrefixTuningConfig) -> list[str]:
    require_token_inputs(model, "prefix tuning")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(
            "prefix tuning supports decoder-only models; for an encoder-decoder model (e.g. T5) use "
            "prompt_tuning, lora or bottleneck (PEFT 0.21's seq2seq prefix reuses the first layer's prefix in every layer)"
        )
    shape = kv_shape(model)
    layers, kv_heads, head_dim = shape
    if config.init == "text":
        prefix = text_prefix(model, text_token_ids(model, config.init_text, config.tokenizer, config.num_virtual_tokens))
    else:  # PEFT's nn.Embedding default: N(0, 1)
        prefix = torch.randn(config.num_virtual_tokens, layers * 2 * kv_heads * head_dim)
    path = input_embedding_path(model)
    wrap_module(model, path, PrefixEmbedding).add_adapter(name, prefix, shape)
    return [path]


def to_peft_config(config: PrefixTuningConfig) -> dict[str, Any]:
    return {"num_virtual_tokens": config.num_virtual_tokens, "prefix_projection": False, "init_weights": None}


def model_keys(model: nn.Module, config: PrefixTuningConfig) -> dict[str, Any]:
    """PEFT records the key/value width for grouped-query attention: token_dim = kv heads * head dim."""
    _, kv_heads, head_dim = kv_shape(model)
    return {
        **prompt_learning_keys(model), "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads,
        "encoder_hidden_size": kv_heads * head_dim,
    }


def from_peft_config(raw: dict[str, Any]) -> PrefixTuningConfig:
    """PEFT saves a projected prefix already projected ((N, L * 2 * D) either way), so both kinds load."""
    if raw.get("num_transformer_submodules") == 2:
        raise AdapterError("an encoder-decoder prefix (num_transformer_submodules 2) is not supported; see prefix_tuning.py")
    return PrefixTuningConfig(num_virtual_tokens=int(raw.get("num_virtual_tokens")), init="random")


def check(config: PrefixTuningConfig) -> list[str]:
    ok = config.num_virtual_tokens >= 1
    return [] if ok else ["prefix_tuning.num_virtual_tokens: must be at least 1 (typical: 10-30)"]


METHOD = Method(
    "prefix_tuning", "Trainable key/value prefixes in the attention of every layer (Li & Liang)",
    Capabilities(
        mergeable=False, packable=False, identity_init=False,
        gradient_checkpointing="prefix tuning injects its prefix through the key/value cache, which recomputation "
        "in backward would extend twice",
    ),
    sections={"prefix_tuning": PrefixTuningConfig}, section="prefix_tuning", config_cls=PrefixTuningConfig,
    attach=attach, to_peft_config=to_peft_config, from_peft_config=from_peft_config, peft_type="PREFIX_TUNING",
    model_keys=model_keys, to_file_state=to_file_state, from_file_state=from_file_state, check=check,
)

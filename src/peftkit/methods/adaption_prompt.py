"""LLaMA-Adapter adaption prompts: learned prompts attended by the top L layers through a zero gate.

Each adapted attention module gets a prompt P (1, len, D) and a gate g (starts at 0). Its output
becomes attn(x) + g * softmax(q K_P^T / sqrt(hd)) V_P (then o_proj for Llama), where K_P, V_P are
the layer's own key/value projections of P and q the layer's (rotary-embedded) queries. With
g = 0 a fresh adapter is exactly the base model. Same layout, keys and arithmetic as PEFT 0.21's
ADAPTION_PROMPT (`...self_attn.adaption_prompt`, `...self_attn.adaption_gate`), so files
load both ways. Llama/Mistral and GPT-2, as in PEFT.

Example:
    >>> adapted = attach(model, AdaptionPromptConfig(adapter_len=10, adapter_layers=8))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ..architectures import architecture_of, model_type
from ..errors import ConfigError
from ..inject import wrap_module
from .base import AdapterLayerMixin, Capabilities, Method


@dataclass
class AdaptionPromptConfig:
    """LLaMA-Adapter: learned prompts attended by the top layers through a zero-initialised gate (fresh ≡ base)."""

    adapter_len: int = 10
    """Prompt tokens per adapted layer."""
    adapter_layers: int = 8
    """How many of the top decoder layers get a prompt."""

def _gated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """query (B, H, T, hd), key/value (1, H, len, hd) -> gate * softmax(q k^T / sqrt(hd)) v as (B, T, H * hd)."""
    scores = query @ key.transpose(2, 3) / math.sqrt(query.shape[-1])  # (B, H, T, len)
    probs = gate.to(query.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = probs @ value  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def llama_prompt_output(attn: nn.Module, prompt: torch.Tensor, gate: torch.Tensor, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What the prompt adds to a LlamaAttention's output (B, T, D)."""
    batch, length, _ = hidden.shape
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    query = attn.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
    cos, sin = kwargs["position_embeddings"]
    query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)
    prompt = prompt.to(hidden.dtype)
    key = attn.k_proj(prompt).view(1, prompt.shape[1], -1, head_dim).transpose(1, 2)  # (1, kv, len, hd)
    value = attn.v_proj(prompt).view(1, prompt.shape[1], -1, head_dim).transpose(1, 2)
    groups = heads // key.shape[1]  # grouped-query attention: each key/value head serves `groups` query heads
    out = _gated_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), gate)
    return attn.o_proj(out)


def gpt2_prompt_output(attn: nn.Module, prompt: torch.Tensor, gate: torch.Tensor, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What the prompt adds to a GPT2Attention's output (B, T, D); PEFT applies no c_proj here."""
    batch, length, width = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    query = attn.c_attn(hidden).split(width, dim=2)[0].view(batch, length, heads, head_dim).transpose(1, 2)
    _, key, value = attn.c_attn(prompt.to(hidden.dtype)).split(width, dim=2)  # (1, len, D) each
    key = key.view(1, -1, heads, head_dim).transpose(1, 2)
    value = value.view(1, -1, heads, head_dim).transpose(1, 2)
    return _gated_attention(query, key, value, gate)


PROMPT_OUTPUTS = {"llama": llama_prompt_output, "mistral": llama_prompt_output, "gpt2": gpt2_prompt_output}


class AdaptedAttention(nn.Module, AdapterLayerMixin):
    """An attention module with named gated prompts beside it."""

    adapter_attrs = ("adaption_prompt", "adaption_gate")
    merge_refusal = "the prompt enters through a softmax over its own keys; it is not a weight update"

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt_output = PROMPT_OUTPUTS[kind]
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self._init_adapter_state()

    def add_adapter(self, name: str, adapter_len: int, hidden_size: int) -> None:
        device = next(self.base_layer.parameters()).device
        self.adaption_prompt[name] = nn.Parameter(torch.randn(1, adapter_len, hidden_size, device=device))  # PEFT: N(0, 1)
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=device))  # zero-init: a fresh adapter changes nothing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        name = self.active_adapter
        if name is None:
            return out
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        added = self.prompt_output(self.base_layer, self.adaption_prompt[name], self.adaption_gate[name], hidden, kwargs)
        return (out[0] + added.to(out[0].dtype), *out[1:])

    def extra_repr(self) -> str:
        sizes = {n: tuple(p.shape) for n, p in self.adaption_prompt.items()}
        return f"prompts={sizes}, active={self.active_adapter!r}"


def attention_paths(model: nn.Module, adapter_layers: int) -> tuple[str, list[str]]:
    """(attention module name, paths of the top `adapter_layers` attention modules), PEFT's choice."""
    kind = model_type(model)
    arch = architecture_of(model)
    if kind not in PROMPT_OUTPUTS or arch is None:
        raise ConfigError(
            f"adaption prompts support model types {', '.join(PROMPT_OUTPUTS)} (as PEFT does), not {kind!r}; "
            "use prompt_tuning, lora or bottleneck"
        )
    suffix = arch.attention
    paths = [p for p, m in model.named_modules() if p.endswith("." + suffix) and ".base_layer" not in p]
    if adapter_layers > len(paths):
        raise ConfigError(f"adaption_prompt.adapter_layers is {adapter_layers} but the model has {len(paths)} layers")
    return suffix, paths[-adapter_layers:]


def attach(model: nn.Module, name: str, config: AdaptionPromptConfig) -> list[str]:
    _, paths = attention_paths(model, config.adapter_layers)
    kind = model_type(model)
    for path in paths:
        layer = wrap_module(model, path, lambda attn: AdaptedAttention(attn, kind))
        layer.add_adapter(name, config.adapter_len, model.config.hidden_size)
    return paths


def to_peft_config(config: AdaptionPromptConfig) -> dict[str, Any]:
    return {"adapter_len": config.adapter_len, "adapter_layers": config.adapter_layers}


def model_keys(model: nn.Module, config: AdaptionPromptConfig) -> dict[str, Any]:
    return {"target_modules": attention_paths(model, config.adapter_layers)[0]}


def from_peft_config(raw: dict[str, Any]) -> AdaptionPromptConfig:
    return AdaptionPromptConfig(adapter_len=int(raw.get("adapter_len")), adapter_layers=int(raw.get("adapter_layers")))


def check(config: AdaptionPromptConfig) -> list[str]:
    checks = [
        (config.adapter_len >= 1, "adaption_prompt.adapter_len: must be at least 1 (typical: 10)"),
        (config.adapter_layers >= 1, "adaption_prompt.adapter_layers: must be at least 1"),
    ]
    return [message for ok, message in checks if not ok]


METHOD = Method(
    "adaption_prompt", "LLaMA-Adapter: learned prompts attended by the top layers through a zero-initialised gate",
    Capabilities(mergeable=False, packable=True),
    sections={"adaption_prompt": AdaptionPromptConfig}, section="adaption_prompt", config_cls=AdaptionPromptConfig,
    attach=attach, to_peft_config=to_peft_config, from_peft_config=from_peft_config, peft_type="ADAPTION_PROMPT",
    model_keys=model_keys, check=check,
)

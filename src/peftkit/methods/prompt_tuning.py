"""Prompt tuning: N trainable virtual-token embeddings prepended to every input (Lester et al., 2021).

The soft prompt lives on a wrapper around the model's input embedding (placed by inject.py); the
embedding's own forward is unchanged. While the adapter is active, AdaptedModel asks the wrapper
to `adapt_inputs`: input_ids become inputs_embeds with the prompt in front, the attention mask
gets N ones and labels N -100s. Encoder-decoder models get the prompt in front of the encoder
input (the decoder is untouched). Files are PEFT's PROMPT_TUNING format: one tensor
`prompt_embeddings` of shape (N, token_dim).

Example:
    >>> adapted = attach(model, PromptTuningConfig(num_virtual_tokens=20, init_text="Summarize the outcome"))
    >>> nearest_tokens(prompt_layer(adapted).prompt_embeddings["default"], embedding_weight, k=3)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError
from ..inject import adapter_layers, wrap_module
from ..models import load_tokenizer
from .base import AdapterLayerMixin, Capabilities, Method


@dataclass
class PromptTuningConfig:
    """Prompt tuning: N trainable virtual-token embeddings prepended to every input (encoder input for seq2seq)."""

    num_virtual_tokens: int = 20
    """Virtual tokens N (typical: 20-100); trainable parameters: N * hidden size."""
    init: Literal["text", "random"] = "text"
    """Start from the embeddings of `init_text` (repeated or cut to N tokens), or from random vectors."""
    init_text: str = "Summarize the outcome of this paper"
    """Text whose token embeddings initialise the prompt (with `init: text`)."""
    tokenizer: str | None = None
    """Tokenizer for `init_text` (a folder or Hub id); null: the base model's own."""

IGNORE_INDEX = -100
FILE_KEY = "prompt_embeddings"


# -- helpers shared with prefix tuning -----------------------------------------------------------
def require_token_inputs(model: nn.Module, method: str) -> None:
    """Soft prompts and prefixes are prepended to token ids; a model reading pixels or audio features has none."""
    reads = getattr(model, "main_input_name", "input_ids")
    if reads != "input_ids":
        raise ConfigError(f"{method} prepends virtual tokens to token ids, and {type(model).__name__} reads {reads}; "
                          "use lora, or selective")


def input_embedding_path(model: nn.Module) -> str:
    """Path of the module `model.get_input_embeddings()` returns (`model.embed_tokens`, `transformer.wte`, `shared`)."""
    embedding = model.get_input_embeddings()
    for path, module in model.named_modules():
        if module is embedding:
            return path
    raise ConfigError(f"{type(model).__name__} exposes no input embedding module; soft prompts need one")


def text_token_ids(model: nn.Module, text: str, tokenizer_path: str | None, count: int) -> torch.Tensor:
    """`text`'s token ids repeated or cut to `count` (PEFT's TEXT init), with the base's tokenizer by default."""
    path = tokenizer_path or getattr(model.config, "_name_or_path", "")
    if not path:
        raise ConfigError("init: text needs a tokenizer: set `tokenizer` (a folder or Hub id) or use init: random")
    ids = load_tokenizer(path)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {text!r} has no tokens; give a non-empty text or use init: random")
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return torch.tensor(ids, dtype=torch.long, device=model.get_input_embeddings().weight.device)


def prepend_ones(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, T) attention mask -> (B, count + T): the virtual positions are always attended."""
    if mask.dim() != 2:
        raise AdapterError("soft prompts need a 2D attention mask; packed batches (4D masks) are not supported")
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)


def to_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT stores a prompt-learning adapter as one bare `prompt_embeddings` tensor."""
    (tensor,) = state.values()
    return {FILE_KEY: tensor}


def from_file_state(state: dict[str, torch.Tensor], expected: list[str], config: Any) -> dict[str, torch.Tensor]:
    """Inverse of `to_file_state`; PEFT's seq2seq files hold 2N rows of which only the first N are used."""
    if FILE_KEY not in state:
        raise AdapterError(f"a prompt-learning adapter file holds `{FILE_KEY}`; this one has {sorted(state)[:3]}")
    (key,) = expected
    return {key: state[FILE_KEY][: config.num_virtual_tokens]}


def prompt_learning_keys(model: nn.Module) -> dict[str, Any]:
    """PEFT's PromptLearningConfig keys that describe the base model (one transformer submodule: ours)."""
    config = model.config
    return {
        "token_dim": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_transformer_submodules": 1,
        "modules_to_save": None,
    }


# -- the layer -------------------------------------------------------------------------------------
class SoftPromptEmbedding(nn.Module, AdapterLayerMixin):
    """The input embedding with named soft prompts beside it (each (N, D), fp32)."""

    adapter_attrs = ("prompt_embeddings",)
    merge_refusal = "a soft prompt adds input positions; there is no weight to fold it into"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt_embeddings = nn.ParameterDict()
        self._init_adapter_state()

    def add_adapter(self, name: str, prompt: torch.Tensor) -> None:
        device = self.base_layer.weight.device
        self.prompt_embeddings[name] = nn.Parameter(prompt.detach().to(device, torch.float32).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(input_ids)

    def adapt_inputs(self, model: nn.Module, inputs: dict[str, Any], generating: bool) -> tuple[dict[str, Any], int]:
        """input_ids -> inputs_embeds with the prompt in front; mask and labels widened to match."""
        ids = inputs.pop("input_ids", None)
        embeds = inputs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.base_layer(ids)  # (B, T, D)
        prompt = self.prompt_embeddings[self.active_adapter].to(embeds.dtype)  # (N, D)
        count, batch = prompt.shape[0], embeds.shape[0]
        inputs["inputs_embeds"] = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)  # (B, N + T, D)
        if inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = prepend_ones(inputs["attention_mask"], count)
        if getattr(model.config, "is_encoder_decoder", False):
            return inputs, 0  # the prompt went into the encoder; decoder positions are unchanged
        if inputs.get("position_ids") is not None:
            raise AdapterError("prompt tuning prepends its virtual tokens to each row; position_ids (packing) are not supported")
        if inputs.get("labels") is not None:
            labels = inputs["labels"]
            inputs["labels"] = torch.cat([labels.new_full((batch, count), IGNORE_INDEX), labels], dim=1)
        if generating and ids is not None:
            inputs["input_ids"] = ids  # generate() then returns the prompt's ids followed by the new tokens
        return inputs, count

    def extra_repr(self) -> str:
        sizes = {n: tuple(p.shape) for n, p in self.prompt_embeddings.items()}
        return f"prompts={sizes}, active={self.active_adapter!r}"


def initial_prompt(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """(N, D): the embeddings of `init_text`'s tokens, or random vectors at the vocabulary's scale."""
    embedding = model.get_input_embeddings()
    if config.init == "random":
        scale = embedding.weight.detach().float().std()
        return torch.randn(config.num_virtual_tokens, embedding.weight.shape[1]) * scale
    ids = text_token_ids(model, config.init_text, config.tokenizer, config.num_virtual_tokens)
    with torch.no_grad():
        return embedding(ids).float()


def attach(model: nn.Module, name: str, config: PromptTuningConfig) -> list[str]:
    require_token_inputs(model, "prompt tuning")
    path = input_embedding_path(model)
    prompt = initial_prompt(model, config)
    wrap_module(model, path, SoftPromptEmbedding).add_adapter(name, prompt)
    return [path]


def nearest_tokens(prompt: torch.Tensor, vocabulary: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each virtual token (N, D) to every vocabulary embedding (V, D): top-k (scores, ids), (N, k).

    Example:
        >>> scores, ids = nearest_tokens(layer.prompt_embeddings["default"], layer.base_layer.weight, k=3)
        >>> [tokenizer.decode([i]) for i in ids[0]]
    """
    similarity = F.normalize(prompt.detach().float(), dim=-1) @ F.normalize(vocabulary.detach().float(), dim=-1).T
    return similarity.topk(min(k, vocabulary.shape[0]), dim=-1)


def soft_prompt_neighbours(adapted: nn.Module, tokenizer: Any, name: str | None = None, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each virtual token of prompt-tuning adapter `name`: its k nearest vocabulary tokens and their cosine."""
    name = name or adapted.active_adapter
    for _, layer in adapter_layers(adapted.model):
        if isinstance(layer, SoftPromptEmbedding) and name in layer.prompt_embeddings:
            scores, ids = nearest_tokens(layer.prompt_embeddings[name], layer.base_layer.weight, k)
            return [
                [(tokenizer.decode([int(i)]), round(float(s), 4)) for s, i in zip(row_scores, row_ids)]
                for row_scores, row_ids in zip(scores, ids)
            ]
    raise AdapterError(f"adapter {name!r} is not a prompt-tuning adapter; nearest tokens need a soft prompt")


def to_peft_config(config: PromptTuningConfig) -> dict[str, Any]:
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "prompt_tuning_init": config.init.upper(),
        "prompt_tuning_init_text": config.init_text if config.init == "text" else None,
        "tokenizer_kwargs": None,
    }


def model_keys(model: nn.Module, config: PromptTuningConfig) -> dict[str, Any]:
    """Base-model keys; PEFT requires `tokenizer_name_or_path` whenever the init is TEXT."""
    tokenizer = config.tokenizer or getattr(model.config, "_name_or_path", None) or None
    return {**prompt_learning_keys(model), "tokenizer_name_or_path": tokenizer if config.init == "text" else None}


def from_peft_config(raw: dict[str, Any]) -> PromptTuningConfig:
    """The loaded weights replace the init, so a loaded adapter never needs its (maybe absent) tokenizer."""
    text = raw.get("prompt_tuning_init_text")
    return PromptTuningConfig(
        num_virtual_tokens=int(raw.get("num_virtual_tokens")), init="random",
        init_text=text if isinstance(text, str) else PromptTuningConfig.init_text,
    )


def check(config: PromptTuningConfig) -> list[str]:
    ok = config.num_virtual_tokens >= 1
    return [] if ok else ["prompt_tuning.num_virtual_tokens: must be at least 1 (typical: 20-100)"]


METHOD = Method(
    "prompt_tuning", "Trainable virtual-token embeddings prepended to every input (Lester et al.)",
    Capabilities(mergeable=False, packable=False, identity_init=False),
    sections={"prompt_tuning": PromptTuningConfig}, section="prompt_tuning", config_cls=PromptTuningConfig,
    attach=attach, to_peft_config=to_peft_config, from_peft_config=from_peft_config, peft_type="PROMPT_TUNING",
    model_keys=model_keys, to_file_state=to_file_state, from_file_state=from_file_state, check=check,
)

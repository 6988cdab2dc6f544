"""The contract every method honours, and the bookkeeping its layers share.

A method is a file with (1) a config dataclass, (2) layers that satisfy `AdapterLayer`, and (3) a
`METHOD = Method(...)` entry listed in `methods/registry.py`. inject.py places the layers; the layers never place
themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class AdapterLayer(Protocol):
    """A module that wraps `base_layer` and holds one or more named adapters beside it.

    Parameters of adapter `name` live in `nn.ModuleDict`s keyed by `name` (PEFT's layout), so the
    PEFT file key is the parameter's path with `.name` removed.
    """

    base_layer: nn.Module
    adapter_attrs: tuple[str, ...]

    def adapter_names(self) -> list[str]: ...

    def set_active(self, name: str | None) -> None:
        """Route forward through adapter `name`, or through the base alone when None."""

    def remove_adapter(self, name: str) -> None: ...

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight (methods that cannot merge raise)."""

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""


@runtime_checkable
class InputAdapterLayer(Protocol):
    """An adapter layer that changes the model's inputs (virtual tokens, a key/value prefix), not a module's output.

    It sits on the input embedding (placed by inject.py, its forward unchanged); AdaptedModel calls
    `adapt_inputs` before `forward` / `generate` while its adapter is active.
    """

    active_adapter: str | None

    def adapt_inputs(self, model: nn.Module, inputs: dict[str, Any], generating: bool) -> tuple[dict[str, Any], int]:
        """The model's keyword inputs for the active adapter, and how many positions it prepended to the output."""


class AdapterLayerMixin:
    """Shared state handling for adapter layers: active adapter, merges, exact unmerge."""

    adapter_attrs: tuple[str, ...] = ()
    can_merge: bool = False

    def _init_adapter_state(self) -> None:
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self._weight_before_merge: torch.Tensor | None = None

    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_attrs[0])
        return list(first.keys())

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.adapter_names():
            raise KeyError(name)
        self.active_adapter = name

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (models read e.g. `self.wo.weight.dtype`)."""
        return self.base_layer.weight  # type: ignore[attr-defined]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)  # type: ignore[attr-defined]

    @property
    def num_embeddings(self) -> int:
        """A wrapped embedding's row count (Whisper reads `embed_positions.num_embeddings`)."""
        return self.base_layer.num_embeddings  # type: ignore[attr-defined]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if not self.can_merge:
            raise NotImplementedError(f"{type(self).__name__} cannot merge")
        if name in self.merged_adapters:
            return
        weight = self.base_layer.weight  # type: ignore[attr-defined]
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.data.clone()
        delta = self.delta_weight(name)
        weight.data = (weight.data.float() + delta.float()).to(weight.dtype)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._weight_before_merge is None:
            return
        self.base_layer.weight.data = self._weight_before_merge  # type: ignore[attr-defined]
        self._weight_before_merge = None
        self.merged_adapters = []


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; config checks, the trainer, the estimator, serving and the tests read these."""

    mergeable: bool
    """The trained update folds into the base weights (merge, `peftkit merge`)."""
    packable: bool
    """Its parameters act per token, so packed examples (and padding-free rows) stay independent (a soft
    prompt or prefix is prepended once per sequence, not once per packed example)."""
    row_routable: bool = False
    """Serving can mix its adapters per batch row (gathered B A matmuls); others get batches of their own."""
    quantizable_base: bool = False
    """It trains on a 4/8-bit quantized base (its layers wrap bitsandbytes linears)."""
    identity_init: bool = True
    """A fresh adapter leaves every output unchanged (soft prompts and prefixes do not)."""
    added_tokens: bool = False
    """It can train and save resized embedding / head rows beside the adapter (`data.add_special_tokens`)."""
    gradient_checkpointing: str | None = None
    """None: works under gradient checkpointing; else why it refuses."""

    @property
    def padding_free(self) -> bool:
        """Padding-free rows are packed rows with per-example attention: the same per-token condition."""
        return self.packable


@dataclass(frozen=True)
class Method:
    """One registry entry: everything the rest of peftkit knows about a method, declared in the method's file."""

    name: str
    description: str
    capabilities: Capabilities
    sections: dict[str, type] = field(default_factory=dict)
    """The run-config sections this file declares (`lora:` -> LoraConfig); RunConfig is built from them."""
    section: str | None = None
    """The section holding the adapter's config (qlora reads `lora:`); None for a method without an adapter (full)."""
    config_cls: type | None = None
    """The adapter config's class (the class of `section`)."""
    attach: Callable[[nn.Module, str, Any], list[str]] | None = None
    """attach(model, adapter_name, config) -> the module paths it adapted (via inject.py)."""
    to_peft_config: Callable[[Any], dict[str, Any]] | None = None
    """The method's keys for adapter_config.json (PEFT's own keys where PEFT has the method)."""
    from_peft_config: Callable[[dict[str, Any]], Any] | None = None
    """Inverse of `to_peft_config`."""
    peft_type: str | None = None
    model_keys: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    """model_keys(model, config) -> adapter_config.json keys that describe the base (PEFT's token_dim, num_layers...)."""
    to_file_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """Rename the adapter's tensors for its file (prompt-learning methods store one bare `prompt_embeddings`)."""
    from_file_state: Callable[[dict[str, torch.Tensor], list[str], Any], dict[str, torch.Tensor]] | None = None
    """from_file_state(file tensors, expected keys, config) -> tensors under the expected keys (inverse of the above)."""
    prepare_base: Callable[[nn.Module, Any], None] | None = None
    """prepare_base(model, run_config) before the adapter is attached: QLoRA quantizes, full unfreezes."""
    check: Callable[[Any], list[str]] | None = None
    """check(section config) -> problems (`lora.r: must be at least 1`) the types cannot express."""

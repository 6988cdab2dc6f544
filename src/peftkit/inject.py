"""The only code that swaps modules in a model: target matching, wrapping and unwrapping.

Methods build layers; this module decides where they go.

Example:
    >>> paths = match_targets(model, ["q_proj", "v_proj"])      # suffix match on module names
    >>> layer = wrap_module(model, paths[0], LoraLinear)         # replaces it in place
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence, TypeVar

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError
from .methods.base import AdapterLayerMixin

LINEAR_TYPES = (nn.Linear, Conv1D)

T = TypeVar("T", bound=nn.Module)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers (what a user can put in target_modules)."""
    names = {path.rsplit(".", 1)[-1] for path, mod in model.named_modules() if isinstance(mod, LINEAR_TYPES)}
    return sorted(names)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {path for path, mod in model.named_modules() if head is not None and mod is head}


def is_match(path: str, targets: str | Sequence[str]) -> bool:
    """Does module `path` match `targets`: a regex (full match) or names matched exactly or as a dotted suffix?"""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def match_targets(model: nn.Module, targets: str | Sequence[str], types: tuple[type, ...] = LINEAR_TYPES) -> list[str]:
    """Paths of the modules of `types` that `targets` names (exact, suffix, regex or 'all-linear')."""
    heads = _output_head_names(model)
    found = []
    wrappers = tuple(p + "." for p, m in model.named_modules() if isinstance(m, AdapterLayerMixin))
    for path, module in model.named_modules():
        layer = getattr(module, "base_layer", None) if isinstance(module, AdapterLayerMixin) else module
        if not isinstance(layer, types):  # a wrapped layer matches at its own path (another adapter joins it)
            continue
        if path.startswith(wrappers):
            continue  # inside a wrapper: its base layer or an adapter's own linears
        if targets == "all-linear":
            if path not in heads:
                found.append(path)
        elif is_match(path, targets):
            found.append(path)
    if not found:
        raise ConfigError(
            f"target_modules {targets!r} matched no {'/'.join(t.__name__ for t in types)} layer; "
            f"this model's linear layers are: {', '.join(linear_layer_names(model))}"
        )
    return found


def match_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of any modules (not only linear) whose name is or ends with one of `names`."""
    found = [p for p, m in model.named_modules() if p and is_match(p, names) and not isinstance(m, AdapterLayerMixin)]
    found = [p for p in found if ".original_module" not in p and ".modules_to_save." not in p]
    missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in found)]
    if missing:
        top = sorted({p.rsplit(".", 1)[-1] for p, _ in model.named_modules() if p})[:40]
        raise ConfigError(f"modules_to_save {missing} matched no module; module names include: {', '.join(top)}")
    return found


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def wrap_module(model: nn.Module, path: str, wrapper: Callable[[nn.Module], T]) -> T:
    """Wrap the module at `path` (or return the existing wrapper of that type, to add another adapter)."""
    current = model.get_submodule(path)
    if isinstance(current, AdapterLayerMixin):
        if not isinstance(current, wrapper if isinstance(wrapper, type) else type(current)):
            raise ConfigError(f"{path} already holds a {type(current).__name__}; one method per layer")
        return current  # type: ignore[return-value]
    new = wrapper(current)
    replace_module(model, path, new)
    return new


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayerMixin]]:
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayerMixin):
            yield path, module


def unwrap_all(model: nn.Module) -> None:
    """Put every wrapped base module back in place (after merging, this gives a plain model)."""
    for path, layer in list(adapter_layers(model)):
        replace_module(model, path, layer.base_layer)  # type: ignore[attr-defined]


def convert_layers(model: nn.Module, layer_type: type, convert: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every module whose type is exactly `layer_type` by `convert(module)`; returns their paths.

    Used to swap a layer for a variant that shares its weights (e.g. serving's row-routed LoRA).
    """
    paths = [path for path, module in model.named_modules() if type(module) is layer_type]
    for path in paths:
        replace_module(model, path, convert(model.get_submodule(path)))
    return paths

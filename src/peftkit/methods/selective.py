"""Selective tuning: train chosen tensors of the base model itself (top layers, components, BitFit).

No new layers: each module owning a selected tensor is wrapped, and the wrapper holds a trainable
copy of that tensor per adapter (`selective_params[name]`), used in place of the frozen original
by `torch.func.functional_call`. So disabling gives the base exactly, several selections can sit
on one base, and merging copies the trained values in (unmerge restores the originals bit for bit).

Files: `adapter_model.safetensors` holds only the selected tensors, under their real names
(`base_model.model.<parameter name in the base>`); `adapter_config.json` has
`peft_type: PEFTKIT_SELECTIVE` (PEFT refuses the unknown type instead of mis-loading it) and the
selection in a `peftkit` section, from which loading selects the same tensors again.

A tensor shared by several modules (tied input/output embeddings, T5's `shared`) is trained once:
the first module owning it holds the copy, the others read it.

Example:
    >>> adapted = attach(model, SelectiveConfig(top_layers=2, components=["attention", "norms"]))
    >>> adapted = attach(model, SelectiveConfig(top_layers=0, biases_only=True))   # BitFit
"""

from __future__ import annotations

from dataclasses import dataclass, field

import re
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import wrap_module
from .base import AdapterLayerMixin, Capabilities, Method


@dataclass
class SelectiveConfig:
    """Train chosen parts of the base model itself (no new layers); only those tensors are saved."""

    layers: list[int] = field(default_factory=list)
    """Transformer block indices to train (negative counts from the end); when given, `top_layers` is ignored."""
    top_layers: int = 2
    """Train the last N blocks of each stack (T5: of the encoder and of the decoder); 0 with no `layers`: every block."""
    components: list[Literal["attention", "mlp", "norms", "embeddings", "head"]] = field(default_factory=list)
    """Parts to train; empty: all parts of the chosen blocks. Embeddings, head and final norms are outside the
    blocks and are trained only when named here."""
    biases_only: bool = False
    """Train only bias vectors of the selection (BitFit)."""

PEFT_TYPE = "PEFTKIT_SELECTIVE"
COMPONENTS = ("attention", "mlp", "norms", "embeddings", "head")
CONTAINER = "selective_params"
_BLOCK = re.compile(r"(^|\.)(layers|layer|h|block|blocks)\.(\d+)(\.|$)")


class SelectiveLayer(nn.Module, AdapterLayerMixin):
    """A base module whose chosen parameters are replaced by trainable copies while an adapter is active."""

    adapter_attrs = (CONTAINER,)
    can_merge = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.selective_params = nn.ModuleDict()  # adapter name -> module whose parameters are named like the base's
        self.shared_from: dict[str, dict[str, tuple[SelectiveLayer, str]]] = {}  # name -> {param: (owner, its param)}
        self._params_before_merge: dict[str, torch.Tensor] = {}
        self._init_adapter_state()

    def add_adapter(self, name: str, own: list[str], shared: dict[str, tuple[SelectiveLayer, str]]) -> None:
        """Train copies of parameters `own`; read `shared` ones from the layer that owns the tied tensor."""
        holder = nn.Module()
        for pname in own:
            original = self.base_layer.get_parameter(pname).detach()
            dtype = torch.float32 if original.dtype in (torch.float16, torch.bfloat16) else original.dtype
            holder.register_parameter(pname, nn.Parameter(original.to(dtype).clone()))
        self.selective_params[name] = holder
        self.shared_from[name] = dict(shared)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.shared_from.pop(name, None)

    def replacements(self, name: str) -> dict[str, torch.Tensor]:
        """{parameter name: tensor used instead of the base's} for adapter `name`, in the base's dtype."""
        values = dict(self.selective_params[name].named_parameters())
        for pname, (owner, owner_pname) in self.shared_from[name].items():
            values[pname] = owner.selective_params[name].get_parameter(owner_pname)
        return {p: v.to(self.base_layer.get_parameter(p).dtype) for p, v in values.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, self.replacements(name), args, kwargs)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Copy the trained tensors into the base (tied ones are copied by their owner layer)."""
        if self.merged_adapters:
            if name not in self.merged_adapters:
                raise ConfigError("another selective adapter is merged here; unmerge it first")
            return
        for pname, value in self.selective_params[name].named_parameters():
            target = self.base_layer.get_parameter(pname)
            self._params_before_merge[pname] = target.detach().clone()
            target.copy_(value.to(target.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for pname, original in self._params_before_merge.items():
            self.base_layer.get_parameter(pname).copy_(original)
        self._params_before_merge = {}
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"adapters={ {n: [p for p, _ in h.named_parameters()] for n, h in self.selective_params.items()} }"


# -- which tensors -----------------------------------------------------------------------------


def block_position(path: str) -> tuple[str, int] | None:
    """(stack, index) of the transformer block holding `path`: `model.layers.3.mlp` -> (`model.layers`, 3)."""
    match = _BLOCK.search(path)
    return (path[: match.start(3) - 1], int(match.group(3))) if match else None


def component(path: str, module: nn.Module, head: nn.Module | None) -> str:
    """attention | mlp | norms | embeddings | head | other, from the module's type and name."""
    if head is not None and module is head:
        return "head"
    if "norm" in type(module).__name__.lower():
        return "norms"
    inside_block = block_position(path) is not None
    if isinstance(module, nn.Embedding) and not inside_block:
        return "embeddings"
    lowered = path.lower()
    if inside_block and ("attn" in lowered or "attention" in lowered):
        return "attention"
    if inside_block and any(k in lowered for k in ("mlp", "dense", "ffn", "feed_forward")):
        return "mlp"
    return "other"


def chosen_blocks(counts: dict[str, int], config: SelectiveConfig) -> dict[str, set[int]]:
    """Block indices to train per stack (T5 has an encoder and a decoder stack)."""
    chosen = {}
    for stack, count in counts.items():
        if config.layers:
            bad = [i for i in config.layers if not -count <= i < count]
            if bad:
                raise ConfigError(f"selective.layers {bad}: {stack} has blocks 0..{count - 1} (or -{count}..-1)")
            chosen[stack] = {i % count for i in config.layers}
        elif config.top_layers:
            chosen[stack] = set(range(max(0, count - config.top_layers), count))
        else:
            chosen[stack] = set(range(count))
    return chosen


def is_selected(path: str, pname: str, module: nn.Module, head: nn.Module | None, blocks: dict[str, set[int]],
                config: SelectiveConfig) -> bool:
    """Block tensors: in a chosen block and a chosen component. Others (embeddings, head, final norms): named."""
    if config.biases_only and pname != "bias":
        return False
    kind = component(path, module, head)
    position = block_position(path)
    if position is None:
        return kind in config.components
    stack, index = position
    return index in blocks[stack] and (not config.components or kind in config.components)


def parameter_sites(model: nn.Module) -> list[tuple[str, str, nn.Module, nn.Parameter]]:
    """(module path, parameter name, module, parameter) for every module's own parameters, shared ones repeated."""
    wrapped = [p for p, m in model.named_modules() if isinstance(m, AdapterLayerMixin)]
    sites = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path.startswith(w + ".") for w in wrapped) or isinstance(module, AdapterLayerMixin):
            continue  # inside another adapter's wrapper
        sites.extend((path, pname, module, param) for pname, param in module.named_parameters(recurse=False))
    return sites


def select(model: nn.Module, config: SelectiveConfig) -> list[tuple[str, str, nn.Parameter]]:
    """Every (module path, parameter name, tensor) to train; a tied tensor appears at each of its sites."""
    sites = parameter_sites(model)
    counts: dict[str, int] = {}
    for path, *_ in sites:
        position = block_position(path)
        if position:
            counts[position[0]] = max(counts.get(position[0], 0), position[1] + 1)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    blocks = chosen_blocks(counts, config)
    chosen = {id(param) for path, pname, module, param in sites if is_selected(path, pname, module, head, blocks, config)}
    if not chosen:
        raise ConfigError(f"the selective config {config} matched no parameter of this model{_hint(sites, config)}")
    return [(path, pname, param) for path, pname, _, param in sites if id(param) in chosen]


def _hint(sites: list[tuple[str, str, nn.Module, nn.Parameter]], config: SelectiveConfig) -> str:
    if config.biases_only and not any(pname == "bias" for _, pname, _, _ in sites):
        return " (it has no bias vectors: BitFit needs a model with biases, e.g. GPT-2 or BERT; use components: [norms] instead)"
    return f"; components are {', '.join(COMPONENTS)}, and embeddings / head / final norms must be named in components"


def attach(model: nn.Module, name: str, config: SelectiveConfig) -> list[str]:
    """Wrap each module owning a selected tensor (via inject.py); returns the wrapped module paths."""
    targets = select(model, config)
    owners: dict[int, tuple[SelectiveLayer, str]] = {}
    own: dict[str, list[str]] = {}
    shared: dict[str, dict[str, tuple[SelectiveLayer, str]]] = {}
    layers = {path: wrap_module(model, path, SelectiveLayer) for path in dict.fromkeys(p for p, _, _ in targets)}
    for path, pname, param in targets:
        if id(param) in owners:
            shared.setdefault(path, {})[pname] = owners[id(param)]
        else:
            owners[id(param)] = (layers[path], pname)
            own.setdefault(path, []).append(pname)
    for path, layer in layers.items():
        layer.add_adapter(name, own.get(path, []), shared.get(path, {}))
    return list(layers)


# -- files -------------------------------------------------------------------------------------


def to_peft_config(config: SelectiveConfig) -> dict[str, Any]:
    return {"peftkit": {"method": "selective", "layers": list(config.layers), "top_layers": config.top_layers,
                        "components": list(config.components), "biases_only": config.biases_only}}


def from_peft_config(raw: dict[str, Any]) -> SelectiveConfig:
    section = raw.get("peftkit")
    if not isinstance(section, dict) or section.get("method") != "selective":
        raise ValueError(f"a {PEFT_TYPE} adapter needs a `peftkit` section with method: selective")
    components = list(section.get("components") or [])
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"components {unknown} are not ones peftkit knows ({', '.join(COMPONENTS)})")
    return SelectiveConfig(layers=[int(i) for i in section.get("layers") or []], top_layers=int(section.get("top_layers", 0)),
                           components=components, biases_only=bool(section.get("biases_only", False)))


def to_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...q_proj.selective_params.bias` -> `...q_proj.bias`: the tensor's real name in the base."""
    return {key.replace(f".{CONTAINER}.", "."): tensor for key, tensor in state.items()}


def from_file_state(state: dict[str, torch.Tensor], expected: list[str], config: Any) -> dict[str, torch.Tensor]:
    """Inverse of `to_file_state` for the keys this model expects (others pass through, to be reported)."""
    real = {key.replace(f".{CONTAINER}.", "."): key for key in expected}
    return {real.get(key, key): tensor for key, tensor in state.items()}


def check(config: SelectiveConfig) -> list[str]:
    ok = config.top_layers >= 0
    return [] if ok else ["selective.top_layers: must be non-negative (0 with no layers: every block)"]


METHOD = Method(
    "selective", "Train chosen tensors of the base itself (layers, components, BitFit biases)",
    Capabilities(mergeable=True, packable=True),
    sections={"selective": SelectiveConfig}, section="selective", config_cls=SelectiveConfig, attach=attach,
    to_peft_config=to_peft_config, from_peft_config=from_peft_config, peft_type=PEFT_TYPE,
    to_file_state=to_file_state, from_file_state=from_file_state, check=check,
)

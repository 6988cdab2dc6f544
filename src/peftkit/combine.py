"""A new LoRA adapter from a weighted combination of others (HF PEFT's `add_weighted_adapter`).

Per adapted layer, with weights w_i and scalings s_i (the new adapter has alpha = r, scaling 1):

- `linear`: A = sum sign_i sqrt(|w_i s_i|) A_i, B = sum sqrt(|w_i s_i|) B_i. Same rank for all;
  cheap but approximate (the cross terms B_i A_j come along).
- `cat`: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 B_2 ...]: exactly sum w_i s_i B_i A_i, rank sum r_i.
- `svd`: the exact weighted sum of deltas, re-factorised to rank `rank` (default the largest r_i)
  by a truncated SVD: B = U_r S_r, A = V_r^T.

Example:
    >>> combine_adapters(adapted, ["outcome", "challenge"], [0.5, 0.5], "both", how="svd")
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal, Sequence

import torch

from . import inject
from .adapters import AdaptedModel, read_sidecar
from .artifacts import load_artifact
from .errors import AdapterError
from .methods.lora import LoraConfig, LoraLinear

log = logging.getLogger(__name__)

HOW = ("linear", "cat", "svd")
Combination = Literal["linear", "cat", "svd"]


def combined_rank(configs: Sequence[LoraConfig], how: str, rank: int | None) -> int:
    """The new adapter's rank for `how` (PEFT's rules)."""
    ranks = [c.r for c in configs]
    if how == "linear":
        if len(set(ranks)) != 1:
            raise AdapterError(f"linear combination needs adapters of one rank, got ranks {ranks}; use cat or svd")
        return ranks[0]
    if how == "cat":
        return sum(ranks)
    if rank is not None and rank < 1:
        raise AdapterError(f"rank must be at least 1, got {rank}")
    return rank or max(ranks)


def _check(adapted: AdaptedModel, names: Sequence[str], weights: Sequence[float], how: str, new_name: str) -> list[LoraConfig]:
    if how not in HOW:
        raise AdapterError(f"combination {how!r} is not one of {', '.join(HOW)}")
    if not names:
        raise AdapterError("name at least one adapter to combine")
    if len(names) != len(weights):
        raise AdapterError(f"{len(names)} adapters but {len(weights)} weights; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError("weights must be finite numbers")
    if new_name in adapted.adapter_configs:
        raise AdapterError(f"an adapter named {new_name!r} already exists")
    configs = []
    for name in names:
        config = adapted.adapter_configs.get(name)
        if config is None:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(adapted.adapter_configs) or 'none'}")
        if not isinstance(config, LoraConfig) or getattr(config, "use_dora", False) or config.modules_to_save:
            raise AdapterError(f"adapter {name!r} is not plain LoRA (DoRA and modules_to_save cannot be combined)")
        configs.append(config)
    return configs


def combine_layer(
    layer: LoraLinear, names: Sequence[str], weights: Sequence[float], how: str, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) of the combination at one layer; adapters absent here are skipped."""
    present = [(n, w) for n, w in zip(names, weights) if n in layer.lora_A]
    a_out = torch.zeros(rank, layer.in_features)
    b_out = torch.zeros(layer.out_features, rank)
    lora_a = {n: layer.lora_A[n].weight.detach().float().cpu() for n, _ in present}
    lora_b = {n: layer.lora_B[n].weight.detach().float().cpu() for n, _ in present}
    if how == "linear":
        for name, w in present:
            scaled = w * layer.scaling[name]
            a_out += math.copysign(math.sqrt(abs(scaled)), scaled) * lora_a[name]
            b_out += math.sqrt(abs(scaled)) * lora_b[name]
    elif how == "cat":
        stacked_a = torch.cat([w * layer.scaling[n] * lora_a[n] for n, w in present], dim=0)
        stacked_b = torch.cat([lora_b[n] for n, _ in present], dim=1)
        a_out[: stacked_a.shape[0]], b_out[:, : stacked_b.shape[1]] = stacked_a, stacked_b
    else:
        delta = sum(w * layer.scaling[n] * (lora_b[n] @ lora_a[n]) for n, w in present)  # (out, in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = min(rank, s.shape[0])
        b_out[:, :keep] = u[:, :keep] * s[:keep]
        a_out[:keep] = vh[:keep]
    return a_out, b_out


def _union_targets(adapted: AdaptedModel, names: Sequence[str]) -> list[str]:
    """Leaf names when they cover exactly the adapted paths (the usual case), else the full paths."""
    paths = sorted({p for n in names for p in adapted.adapter_targets[n]})
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return leaves if sorted(inject.match_targets(adapted.model, leaves)) == paths else paths


@torch.no_grad()
def combine_adapters(
    adapted: AdaptedModel, names: Sequence[str], weights: Sequence[float], new_name: str,
    how: Combination = "svd", rank: int | None = None,
) -> LoraConfig:
    """Add adapter `new_name` = the weighted combination of `names`; the active adapter is unchanged."""
    configs = _check(adapted, names, weights, how, new_name)
    new_rank = combined_rank(configs, how, rank)
    config = LoraConfig(r=new_rank, alpha=float(new_rank), dropout=0.0, target_modules=_union_targets(adapted, names))
    previous = adapted.active_adapter
    adapted.add_adapter(new_name, config)
    adapted.set_adapter(previous)
    for _, layer in inject.adapter_layers(adapted.model):
        if isinstance(layer, LoraLinear) and new_name in layer.lora_A:
            a, b = combine_layer(layer, names, weights, how, new_rank)
            layer.lora_A[new_name].weight.copy_(a)
            layer.lora_B[new_name].weight.copy_(b)
    return config


def combine_folders(
    paths: Sequence[str | Path], weights: Sequence[float], out: str | Path, how: Combination = "svd",
    rank: int | None = None, model: str | None = None,
) -> tuple[Path, LoraConfig]:
    """Load adapter folders onto their base (or `model`), combine them, save the result as a new adapter folder.

    The new folder's peftkit.json keeps the first adapter's prompt format and records the recipe.
    """
    if len(paths) != len(weights):
        raise AdapterError(f"{len(paths)} adapters but {len(weights)} weights; give one weight per adapter")
    adapted = load_artifact(paths[0], model, device="cpu", name="source_0").adapted
    if adapted is None:
        raise AdapterError(f"{paths[0]}: a model folder, not an adapter; combine adapter folders")
    for i, path in enumerate(paths[1:], start=1):
        adapted.load_adapter(path, name=f"source_{i}")
    names = [f"source_{i}" for i in range(len(paths))]
    config = combine_adapters(adapted, names, weights, "combined", how=how, rank=rank)
    metas = [read_sidecar(p) for p in paths]
    if len({json.dumps(m.get("prompt_format"), sort_keys=True) for m in metas}) > 1:
        log.warning("the adapters were trained with different prompt formats; the combination records the first one's")
    metadata = {k: v for k, v in metas[0].items() if k not in ("format_version", "method")}
    metadata["combination"] = {"how": how, "weights": list(weights), "sources": [str(Path(p).resolve()) for p in paths]}
    return adapted.save_adapter(out, "combined", metadata=metadata), config


def split_weights(arguments: Sequence[str], weights: Sequence[str]) -> tuple[list[str], list[float]]:
    """(folders, weights) from the command line, where `--weights 0.5 0.5` leaves the second number among the folders.

    A positional argument that is a number and not an existing path is a weight; `0.5,0.5` also works.
    """
    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    folders = [a for a in arguments if number(a) is None or Path(a).exists()]
    texts = [part for w in weights for part in w.split(",") if part.strip()] + [a for a in arguments if a not in folders]
    values = [number(t) for t in texts]
    if any(v is None for v in values):
        raise AdapterError(f"--weights {' '.join(texts)}: every weight must be a number")
    return folders, [float(v) for v in values if v is not None]

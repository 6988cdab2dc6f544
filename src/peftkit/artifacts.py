"""The one loader of what peftkit (or HF PEFT) writes: every verb that reads a trained result comes here.

A folder is one of:
- an adapter (`adapter_config.json`; peftkit's or PEFT's, QLoRA adapters included: they are LoRA files),
  possibly with its own tokenizer when training added tokens (the base's embeddings are resized to it);
- a full fine-tune (`method: full`) or a merged export: a transformers model folder (`config.json`),
  told apart by `merged_from` in its peftkit.json.
A built-in name, local model folder or Hub id loads as a bare base.

Example:
    >>> artifact = load_artifact("runs/default/adapter")
    >>> artifact.kind, artifact.format.templates[0]
    >>> artifact.generate([{"abstract": "We study ..."}])
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from safetensors import safe_open
from torch import nn

from .adapters import (
    CONFIG_NAME,
    ENCODER_TASKS,
    AdaptedModel,
    read_adapter_config,
    read_adapter_weights,
    read_sidecar,
    resize_for_adapter,
)
from .data.templates import PromptFormat
from .errors import AdapterError
from .generate import generate_texts
from .models import load_model, resolve_device
from .precision import resolve_dtype

Kind = Literal["base", "adapter", "full", "merged"]
DEFAULT_BASE = "smollm2-135m"


@dataclass
class Artifact:
    """A loaded result: the model to run, its tokenizer, the prompt format it was trained with, its metadata."""

    kind: Kind
    model: nn.Module
    tokenizer: Any
    format: PromptFormat
    meta: dict[str, Any] = field(default_factory=dict)
    """The folder's peftkit.json ({} for a bare base or a folder another tool wrote)."""
    adapted: AdaptedModel | None = None
    """The AdaptedModel for an adapter (disable it to run the base), else None."""
    path: Path | None = None

    def generate(self, rows: Sequence[Mapping[str, Any]], base: bool = False, **kwargs: Any) -> list[str]:
        """Answers for `rows` in the saved prompt format (`base`: with the adapter disabled)."""
        context = self.adapted.disable_adapter() if base and self.adapted is not None else nullcontext()
        with context:
            return generate_texts(self.model, self.tokenizer, self.format, rows, **kwargs)


def saved_format(meta: Mapping[str, Any]) -> PromptFormat:
    """The prompt format recorded at training time, canonical phrasing only."""
    raw = meta.get("prompt_format")
    if not raw:
        return PromptFormat(["{prompt}"], chat=True)
    fmt = PromptFormat.from_dict(raw)
    return PromptFormat(fmt.templates[:1], fmt.chat, fmt.system_prompt)


def artifact_kind(path: str | Path) -> Kind:
    """adapter | full | merged for a folder peftkit or PEFT wrote; an AdapterError naming what is missing otherwise."""
    path = Path(path)
    if path.is_file():
        raise AdapterError(f"{path}: is a file; give the folder `peftkit train` or `peftkit merge` wrote")
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter or model folder; give the folder `peftkit train` wrote "
                           "(output_dir/adapter), a merged export or a full fine-tune's output_dir/adapter")
    if (path / CONFIG_NAME).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "merged" if read_sidecar(path).get("merged_from") else "full"
    raise AdapterError(f"{path}: neither an adapter folder ({CONFIG_NAME}) nor a model folder (config.json); "
                       "give the folder `peftkit train` wrote (output_dir/adapter) or a merged export")


def load_artifact(
    spec: str | Path | None, model: str | None = None, device: str = "auto", precision: str = "fp32",
    name: str = "default",
) -> Artifact:
    """Load an adapter folder (onto its recorded base, or `model`), a full or merged model folder, or, with
    `spec` None, the base `model` (a built-in name, folder or Hub id; default smollm2-135m)."""
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    if spec is None:
        base, tokenizer = load_model(model or DEFAULT_BASE, dtype=dtype, device=dev)
        return Artifact("base", base, tokenizer, PromptFormat(["{prompt}"], chat=True))
    path = Path(spec)
    kind = artifact_kind(path)
    meta = read_sidecar(path)
    if kind != "adapter":
        whole, tokenizer = load_model(str(path), dtype=dtype, device=dev)
        whole.eval()
        return Artifact(kind, whole, tokenizer, saved_format(meta), meta, path=path)
    adapted, tokenizer = AdaptedModel.from_pretrained(path, model, name, dtype, dev)
    adapted.eval()
    return Artifact("adapter", adapted, tokenizer, saved_format(meta), meta, adapted, path)


def describe_artifact(path: str | Path) -> dict[str, Any]:
    """What `peftkit inspect` shows: for an adapter its method, targets, rank, parameters and size; for a full
    or merged model folder its architecture, parameters and size; for both the base, template and format."""
    path = Path(path)
    kind = artifact_kind(path)
    meta = read_sidecar(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    fmt = saved_format(meta)
    common = {"template": fmt.templates[0], "chat template": fmt.chat,
              "peftkit format": meta.get("format_version", "none (saved by another tool)")}
    if kind != "adapter":
        return {"kind": "merged model" if kind == "merged" else "full fine-tune", **_describe_model_folder(path, meta),
                "size on disk": f"{size / 1024**2:.2f} MiB", **common}
    _, raw = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    layers = {k.split(".lora_")[0] for k in tensors if ".lora_" in k}
    return {
        "kind": "adapter",
        "method": meta.get("method", raw.get("peft_type")),
        "peft_type": raw.get("peft_type"),
        "base model": raw.get("base_model_name_or_path"),
        "target_modules": raw.get("target_modules"),
        "rank (r)": raw.get("r"),
        "alpha": raw.get("lora_alpha"),
        "adapted layers": len(layers),
        "parameters": f"{sum(t.numel() for t in tensors.values()):,d}",
        "tensors": len(tensors),
        "dtype": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "added tokens": (path / "tokenizer_config.json").is_file(),
        "size on disk": f"{size / 1024**2:.2f} MiB",
        **common,
    }


def _describe_model_folder(path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture and parameter count of a transformers folder, read from its files (no weights loaded)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    count, dtypes = 0, set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                shape = tensor.get_shape()
                count += math.prod(shape)
                dtypes.add(tensor.get_dtype())
    run = meta.get("run_config") or {}
    return {
        "model type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "method": run.get("method", "full" if not meta.get("merged_from") else None),
        "base model": run.get("model"),
        "merged from": meta.get("merged_from"),
        "parameters": f"{count:,d}",
        "dtype": sorted(dtypes),
    }


__all__ = ["ENCODER_TASKS", "Artifact", "artifact_kind", "describe_artifact", "load_artifact", "resize_for_adapter", "saved_format"]

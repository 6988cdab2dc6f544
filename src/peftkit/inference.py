"""Load what `train` wrote (an adapter folder or a full model folder) for generation, merging, inspection.

Example:
    >>> loaded = load_for_inference("runs/default/adapter")
    >>> loaded.generate([{"abstract": "We study ..."}])
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .adapters import CONFIG_NAME, SIDECAR_NAME, AdaptedModel, read_adapter_config, read_adapter_weights, read_sidecar
from .data.templates import PromptFormat, template_fields
from .errors import AdapterError, PeftkitError
from .generate import generate_texts
from .io import atomic_dir
from .methods.quant import merge_dequantized, quantize_base, trained_quantization
from .models import load_model, resolve_device
from .precision import resolve_dtype


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    format: PromptFormat
    adapted: AdaptedModel | None = None

    def generate(self, rows: Sequence[Mapping[str, Any]], base: bool = False, **kwargs: Any) -> list[str]:
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


def load_for_inference(path: str | Path | None, model: str | None = None, device: str = "auto", precision: str = "fp32") -> Loaded:
    """An adapter folder (onto its recorded base, or `model`), a full model folder, or a bare model."""
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    if path is None:
        base, tokenizer = load_model(model or "smollm2-135m", dtype=dtype, device=dev)
        return Loaded(base, tokenizer, PromptFormat(["{prompt}"], chat=True))
    path = Path(path)
    meta = read_sidecar(path) if path.is_dir() else {}
    if (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file():
        full, tokenizer = load_model(str(path), dtype=dtype, device=dev)
        return Loaded(full, tokenizer, saved_format(meta))
    adapted, tokenizer = AdaptedModel.from_pretrained(path, base=model, dtype=dtype, device=dev)
    adapted.eval()
    return Loaded(adapted, tokenizer, saved_format(meta), adapted)


def prompt_rows(fmt: PromptFormat, texts: Sequence[str]) -> list[dict[str, str]]:
    """Put each text into the template's single `{field}`."""
    fields = template_fields(fmt.templates[0])
    if len(set(fields)) != 1:
        raise PeftkitError(f"the adapter's template {fmt.templates[0]!r} has fields {fields}; one field is needed for text prompts")
    return [{fields[0]: t} for t in texts]


@torch.no_grad()
def merge_to_folder(adapter: str | Path, out: str | Path, model: str | None = None) -> tuple[Path, float]:
    """Merge the adapter into its base, check the merge against the unmerged model, write a checkpoint."""
    source, target = Path(adapter).resolve(), Path(out).resolve()
    if source == target or source.is_relative_to(target):
        raise AdapterError(f"--out {out}: writing there would replace the adapter being merged; choose another folder")
    loaded = load_for_inference(adapter, model, device="cpu", precision="fp32")
    if loaded.adapted is None:
        raise AdapterError(f"{adapter}: a full model folder, nothing to merge")
    adapted, tokenizer = loaded.adapted, loaded.tokenizer
    probe = tokenizer("The merged model must agree with the adapter.", return_tensors="pt")
    kwargs = {"decoder_input_ids": probe["input_ids"]} if getattr(adapted.config, "is_encoder_decoder", False) else {}
    quant = trained_quantization(read_sidecar(adapter))
    if quant is not None:  # QLoRA: compare with the quantized model it was trained on; never re-quantize
        quantize_base(adapted.model, quant)
        merged, report = merge_dequantized(adapted, {**probe, **kwargs}, quant)
        max_err = report.max_logit_error
    else:
        before = adapted(**probe, **kwargs).logits
        merged = adapted.merge_and_unload()
        max_err = float((before - merged(**probe, **kwargs).logits).abs().max())
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise AdapterError(f"merging produced NaN/Inf in {name}; the adapter is corrupt")
    out = Path(out)
    meta = read_sidecar(adapter)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sidecar = {**meta, "merged_from": str(Path(adapter).resolve()), "merge_max_logit_error": max_err}
        (tmp / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
    return out, max_err


def describe_adapter(path: str | Path) -> dict[str, Any]:
    """Method, targets, rank, parameter count, size on disk, base model and template."""
    path = Path(path)
    config, raw = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    meta = read_sidecar(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    layers = {k.split(".lora_")[0] for k in tensors if ".lora_" in k}
    fmt = saved_format(meta)
    return {
        "method": meta.get("method", raw.get("peft_type")),
        "peft_type": raw.get("peft_type"),
        "base model": raw.get("base_model_name_or_path"),
        "target_modules": raw.get("target_modules"),
        "rank (r)": raw.get("r"),
        "alpha": raw.get("lora_alpha"),
        "adapted layers": len(layers),
        "parameters": f"{sum(t.numel() for t in tensors.values()):,d}",
        "tensors": len(tensors),
        "dtype": sorted({str(t.dtype).replace('torch.', '') for t in tensors.values()}),
        "size on disk": f"{size / 1024**2:.2f} MiB",
        "template": fmt.templates[0],
        "chat template": fmt.chat,
        "peftkit format": meta.get("format_version", "none (saved by another tool)"),
    }

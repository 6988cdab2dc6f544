"""Merging an adapter into its base (`peftkit merge`) and text prompts for `peftkit generate`.

Loading any trained result is artifacts.load_artifact.

Example:
    >>> path, max_err = merge_to_folder("runs/default/adapter", "runs/default/merged")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .adapters import SIDECAR_NAME, read_sidecar
from .artifacts import load_artifact
from .data.templates import PromptFormat, template_fields
from .errors import AdapterError, PeftkitError
from .io import atomic_dir
from .methods.quant import merge_dequantized, quantize_base, trained_quantization



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
    loaded = load_artifact(adapter, model, device="cpu", precision="fp32")
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

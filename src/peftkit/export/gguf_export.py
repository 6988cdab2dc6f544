"""`peftkit export`: what `train` wrote (or a model folder, or a built-in model) as GGUF for llama.cpp / Ollama.

An adapter is first merged into its base exactly as `peftkit merge` does (a QLoRA base is
dequantized and merged in full precision, and the measured merge error is reported); the merged
checkpoint, a full fine-tune folder or a built-in model then becomes one GGUF file. With
`adapter_only` the LoRA adapter alone becomes llama.cpp's LoRA GGUF, for `--lora` over the base GGUF.

Example:
    >>> result = export_gguf("runs/default/adapter", "smollm2-tuned.gguf", dtype="q8_0", ollama=True)
    >>> result = export_lora_gguf("runs/default/adapter", "adapter.gguf")
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from ..adapters import CONFIG_NAME, read_adapter_config
from ..artifacts import load_artifact
from ..errors import ExportError, ModelError
from ..inference import merge_to_folder
from ..models import BUILTIN_MODELS, resolve_model_path
from .gguf_lora import write_lora_gguf
from .gguf_model import file_type, write_model_gguf
from .layouts import gguf_layout
from .ollama import write_modelfile

SOURCES = "an adapter folder (output_dir/adapter), a full model folder, or a built-in model name"


@dataclass
class ExportResult:
    """What was written."""

    path: Path
    kind: str
    """`model` (merged, full fine-tune or base) or `adapter` (llama.cpp LoRA)."""
    architecture: str
    dtype: str
    size_bytes: int
    merge_max_logit_error: float | None = None
    """Adapters: max |merged - unmerged| logit difference on a probe (QLoRA: against the 4-bit model it trained on)."""
    modelfile: Path | None = None


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """(folder, `adapter` or `model`) for what the user named."""
    path = Path(source)
    if not path.exists() and str(source) in BUILTIN_MODELS:
        return Path(resolve_model_path(str(source))), "model"
    if not path.exists():
        raise ExportError(f"{source}: no such folder; give {SOURCES} ({', '.join(BUILTIN_MODELS)})")
    if path.is_file():
        raise ExportError(f"{source}: is a file; give {SOURCES}")
    if (path / CONFIG_NAME).is_file():
        return path, "adapter"
    if (path / "config.json").is_file():
        return path, "model"
    raise ExportError(f"{source}: neither an adapter folder ({CONFIG_NAME}) nor a model folder (config.json); give {SOURCES}")


def check_destination(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse a destination that is not a .gguf file name, lies inside the source, or exists (unless `overwrite`)."""
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; give a file name ending in .gguf")
    if out.suffix != ".gguf":
        raise ExportError(f"--out {out}: give a file name ending in .gguf")
    if out.resolve().is_relative_to(source.resolve()):
        raise ExportError(f"--out {out}: inside the folder being exported ({source}); write the GGUF file elsewhere")
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out}: exists; pass --overwrite to replace it")


def model_config(folder: Path, kind: str, model: str | None = None) -> Any:
    """The transformers config of the model a GGUF file will hold: the folder's own, or an adapter's base."""
    name = str(folder)
    if kind == "adapter":
        name = model or read_adapter_config(folder)[1].get("base_model_name_or_path")
        if not name:
            raise ExportError(f"{folder}: adapter_config.json records no base_model_name_or_path; pass --model BASE")
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the model config of {name!r}: {str(exc).splitlines()[0]}") from None


def export_gguf(source: str | Path, out: str | Path, dtype: str = "f16", model: str | None = None,
                overwrite: bool = False, ollama: bool = False) -> ExportResult:
    """The merged model (adapter + base), a full fine-tune or a base model as one GGUF file (+ an Ollama Modelfile)."""
    file_type(dtype)
    folder, kind = resolve_source(source)
    out = Path(out)
    check_destination(folder, out, overwrite)
    gguf_layout(model_config(folder, kind, model))  # refuse an architecture before loading or merging anything
    out.parent.mkdir(parents=True, exist_ok=True)
    merge_error = None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
        weights = folder
        if kind == "adapter":  # exactly `peftkit merge`, into a folder deleted once loaded
            weights, merge_error = merge_to_folder(folder, Path(tmp) / "merged", model)
        artifact = load_artifact(weights, device="cpu", precision="fp32")
    extra = {"peftkit.source": str(folder.resolve())}
    if artifact.meta.get("prompt_format"):
        extra["peftkit.prompt_format"] = json.dumps(artifact.meta["prompt_format"], sort_keys=True)
    if merge_error is not None:
        extra["peftkit.merge_max_logit_error"] = f"{merge_error:.3e}"
    path = write_model_gguf(artifact.model, artifact.tokenizer, out, dtype, extra)
    modelfile = write_modelfile(path, artifact.tokenizer) if ollama else None
    return ExportResult(path, "model", gguf_layout(artifact.model.config).name, dtype, path.stat().st_size, merge_error,
                        modelfile)


def export_lora_gguf(source: str | Path, out: str | Path, dtype: str = "f16", model: str | None = None,
                     overwrite: bool = False) -> ExportResult:
    """A LoRA adapter alone as llama.cpp's LoRA GGUF (apply with `--lora` over the base's GGUF)."""
    file_type(dtype)
    folder, kind = resolve_source(source)
    if kind != "adapter":
        raise ExportError(f"{source}: a full model folder has no adapter to export alone; drop --adapter-only")
    out = Path(out)
    check_destination(folder, out, overwrite)
    base_config = model_config(folder, kind, model)
    path, _ = write_lora_gguf(folder, base_config, out, dtype)
    return ExportResult(path, "adapter", gguf_layout(base_config).name, dtype, path.stat().st_size)

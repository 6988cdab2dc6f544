"""Several named adapters on one base model, and their files in HF PEFT's on-disk format.

Example:
    >>> from peftkit import attach, LoraConfig, AdaptedModel
    >>> adapted = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    >>> print(adapted.trainable_report())
    >>> adapted.save_adapter("runs/x/adapter")
    >>> adapted, tokenizer = AdaptedModel.from_pretrained("runs/x/adapter")
"""

from __future__ import annotations

import json
import logging
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import inject
from .errors import AdapterError, ConfigError
from .io import atomic_dir
from .methods.base import AdapterLayerMixin, InputAdapterLayer
from .methods.registry import PEFT_TYPES, method_for_config
from .models import load_encoder, load_model, load_tokenizer
from .methods.lora import ModulesToSave

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
SIDECAR_NAME = "peftkit.json"
TRAIN_WROTE = "give the folder `peftkit train` wrote (output_dir/adapter) or a PEFT adapter folder"


def first_non_finite(modules: list[tuple[str, nn.Module]]) -> str | None:
    """The name of the first floating-point parameter holding NaN or Inf, or None."""
    for path, module in modules:
        for name, param in module.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                return f"{path}.{name}"
    return None


def format_trainable(trainable: int, total: int) -> str:
    """HF PEFT's exact report line."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


class AdaptedModel(nn.Module):
    """A base model with named adapters. Forward, generate and attribute access go to the base."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.adapter_configs: dict[str, Any] = {}
        self.adapter_targets: dict[str, list[str]] = {}
        self.input_layer_paths: dict[str, str] = {}  # adapters that change the inputs (soft prompts) -> their layer
        self.active_adapter: str | None = None
        for p in model.parameters():
            p.requires_grad_(False)

    # -- delegation ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layer = self._input_adapter()
        if layer is None:
            return self.model(*args, **kwargs)
        inputs, virtual = layer.adapt_inputs(self.model, _keyword_inputs(args, kwargs), generating=False)
        out = self.model(**inputs)
        if virtual and getattr(out, "logits", None) is not None:
            out.logits = out.logits[:, virtual:]  # logits stay aligned with input_ids (PEFT keeps the virtual rows)
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        layer = self._input_adapter()
        if layer is None:
            return self.model.generate(*args, **kwargs)
        inputs, _ = layer.adapt_inputs(self.model, _keyword_inputs(args, kwargs), generating=True)
        return self.model.generate(**inputs)

    def adapt_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """`inputs` as the active adapter feeds them to the base (soft prompt or prefix added), and how many
        positions it prepended; unchanged (and 0) for adapters that act inside the model.

        Example:
            >>> inputs, virtual = adapted.adapt_inputs({"input_ids": ids, "attention_mask": mask})
            >>> hidden = adapted.model.model(**inputs).last_hidden_state[:, virtual:]
        """
        layer = self._input_adapter()
        return (inputs, 0) if layer is None else layer.adapt_inputs(self.model, dict(inputs), generating=False)

    def _input_adapter(self) -> InputAdapterLayer | None:
        path = self.input_layer_paths.get(self.active_adapter) if self.active_adapter else None
        layer = self.model.get_submodule(path) if path else None
        return layer if layer is not None and layer.active_adapter is not None else None  # None inside disable_adapter

    # -- adapters -----------------------------------------------------------------------------
    def _layers(self) -> Iterator[tuple[str, AdapterLayerMixin]]:
        return inject.adapter_layers(self.model)

    def add_adapter(self, name: str, config: Any) -> list[str]:
        """Attach a new adapter (it becomes active). Returns the module paths it adapted."""
        if name in self.adapter_configs:
            raise AdapterError(f"an adapter named {name!r} is already attached; delete it first or choose another name")
        if not name.isidentifier():
            raise AdapterError(f"adapter name {name!r} must be a Python identifier (letters, digits, _)")
        if any(layer.merged for _, layer in self._layers()):
            raise AdapterError("unmerge the merged adapter before adding another")
        method = method_for_config(config)
        paths = method.attach(self.model, name, config)
        self.adapter_configs[name] = config
        self.adapter_targets[name] = paths
        for path in paths:
            if isinstance(self.model.get_submodule(path), InputAdapterLayer):
                self.input_layer_paths[name] = path
        self.set_adapter(name)
        return paths

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter (only its parameters train), or None for the bare base."""
        if name is not None and name not in self.adapter_configs:
            raise AdapterError(f"no adapter named {name!r}; attached: {', '.join(self.adapter_configs) or 'none'}")
        for _, layer in self._layers():
            layer.set_active(name if name in layer.adapter_names() else None)
        self.active_adapter = name
        for pname, p in self.model.named_parameters():
            p.requires_grad_(name is not None and _belongs_to(pname, name))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (a merged adapter is unmerged first)."""
        if any(layer.merged for _, layer in self._layers()):
            raise AdapterError("an adapter is merged into the weights; unmerge it before disabling adapters")
        previous = self.active_adapter
        for _, layer in self._layers():
            layer.set_active(None)
        try:
            yield
        finally:
            for _, layer in self._layers():
                layer.set_active(previous if previous in layer.adapter_names() else None)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapter_configs:
            raise AdapterError(f"no adapter named {name!r}")
        for _, layer in self._layers():
            layer.remove_adapter(name)
        for path, layer in list(self._layers()):
            if not layer.adapter_names():
                inject.replace_module(self.model, path, layer.base_layer)  # type: ignore[attr-defined]
        del self.adapter_configs[name]
        del self.adapter_targets[name]
        self.input_layer_paths.pop(name, None)
        if self.active_adapter == name:
            self.set_adapter(None)

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, name: str | None = None) -> None:
        """Fold the adapter into the base weights (forward then costs nothing extra)."""
        name = name or self.active_adapter
        if name is None:
            raise AdapterError("no adapter to merge")
        for _, layer in self._layers():
            if name in layer.adapter_names() and not layer.can_merge and not isinstance(layer, ModulesToSave):
                why = getattr(layer, "merge_refusal", f"{type(layer).__name__} is not a linear update")
                raise AdapterError(f"adapter {name!r} cannot be merged into the base weights: {why}")
        merging = [(path, layer) for path, layer in self._layers() if name in layer.adapter_names() and layer.can_merge]
        fresh = [layer for _, layer in merging if not layer.merged]
        for _, layer in merging:
            layer.merge(name)
        saved = [(path, layer.modules_to_save[name]) for path, layer in self._layers()
                 if isinstance(layer, ModulesToSave) and name in layer.adapter_names()]
        bad = first_non_finite([(path, layer.base_layer) for path, layer in merging] + saved)  # type: ignore[misc]
        if bad is not None:
            for layer in fresh:
                layer.unmerge()  # exact: the kept copy of the base weight goes back
            raise AdapterError(f"merging adapter {name!r} gives NaN/Inf in {bad}, so nothing was merged (the base is "
                               "unchanged); the adapter's weights are broken: retrain or use an earlier checkpoint")

    def unmerge_adapter(self) -> None:
        """Restore the base weights exactly (a copy is kept from the first merge)."""
        for _, layer in self._layers():
            layer.unmerge()

    def merge_and_unload(self, name: str | None = None) -> nn.Module:
        """Merge the adapter and return the plain base model (with trained modules_to_save in place)."""
        name = name or self.active_adapter
        self.merge_adapter(name)
        for path, layer in list(self._layers()):
            if isinstance(layer, ModulesToSave) and name in layer.adapter_names():
                inject.replace_module(self.model, path, layer.modules_to_save[name])
            elif not layer.can_merge and name in layer.adapter_names():
                raise AdapterError(f"{type(layer).__name__} cannot be merged into the base")
            else:
                layer._weight_before_merge = None
                inject.replace_module(self.model, path, layer.base_layer)  # type: ignore[attr-defined]
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    # -- parameters and state -----------------------------------------------------------------
    def trainable_counts(self) -> tuple[int, int]:
        trainable = sum(_param_count(p) for p in self.model.parameters() if p.requires_grad)
        total = sum(_param_count(p) for p in self.model.parameters())
        return trainable, total

    def trainable_report(self) -> str:
        """`trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364` (PEFT's form)."""
        return format_trainable(*self.trainable_counts())

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors, with PEFT's key names (`base_model.model.<path>.lora_A.weight`)."""
        name = name or self.active_adapter
        if name is None:
            raise AdapterError("no adapter to save")
        out = {}
        for key, tensor in self.model.state_dict().items():
            if _belongs_to(key, name):
                tensor = tensor.detach()  # an FSDP-sharded DTensor is gathered (every rank must call this)
                out[PEFT_PREFIX + _strip_adapter_name(key, name)] = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        method = method_for_config(self.adapter_configs[name])
        return method.to_file_state(out) if method.to_file_state else out

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy PEFT-format tensors into adapter `name`; every key and shape must match."""
        expected = {PEFT_PREFIX + _strip_adapter_name(k, name): k for k in self.model.state_dict() if _belongs_to(k, name)}
        own = self.model.state_dict()
        method = method_for_config(self.adapter_configs[name])
        if method.from_file_state:
            state = method.from_file_state(state, list(expected), self.adapter_configs[name])
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise AdapterError(
                f"{source}: tensors do not fit this base model "
                f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}). "
                "Was it trained on another base model or with other target_modules?"
            )
        with torch.no_grad():
            for saved_key, own_key in expected.items():
                tensor, target = state[saved_key], own[own_key]
                if tensor.shape != target.shape:
                    raise AdapterError(
                        f"{source}: {saved_key} has shape {tuple(tensor.shape)}, the base needs {tuple(target.shape)}; "
                        "the weights do not match adapter_config.json (r, target_modules) or were trained on another base"
                    )
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise AdapterError(
                        f"{source}: {saved_key} holds NaN or Inf values; the file is corrupt: retrain or use an earlier checkpoint"
                    )
                target.copy_(tensor.to(target.dtype))

    # -- files --------------------------------------------------------------------------------
    def save_adapter(
        self, path: str | Path, name: str | None = None, metadata: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write `adapter_config.json`, `adapter_model.safetensors` and `peftkit.json` atomically.

        `tensors`: `adapter_state_dict(name)` computed beforehand (under FSDP every rank gathers it,
        and only rank 0 writes).
        """
        name = name or self.active_adapter
        if name is None:
            raise AdapterError("no adapter to save")
        config = self.adapter_configs[name]
        method = method_for_config(config)
        peft_config = {
            "peft_type": method.peft_type,
            "task_type": peft_task_type(self.model),
            "base_model_name_or_path": getattr(self.model.config, "_name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            **method.to_peft_config(config),
            **(method.model_keys(self.model, config) if method.model_keys else {}),
        }
        if "fan_in_fan_out" in peft_config:  # GPT-2's Conv1D stores weights (in, out)
            peft_config["fan_in_fan_out"] = any(getattr(layer, "fan_in_fan_out", False) for _, layer in self._layers())
        if "target_modules" in peft_config and peft_config["target_modules"] is None:
            peft_config["target_modules"] = sorted({p.rsplit(".", 1)[-1] for p in self.adapter_targets[name]})
        tensors = {k: v.contiguous().cpu() for k, v in (tensors if tensors is not None else self.adapter_state_dict(name)).items()}
        sidecar = {"format_version": FORMAT_VERSION, "method": method.name, **(metadata or {})}
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
            (tmp / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
        return path

    def load_adapter(self, path: str | Path, name: str = "default") -> dict[str, Any]:
        """Attach the adapter saved in `path` under `name`; returns its peftkit.json (or {})."""
        config, _ = read_adapter_config(path)
        state = read_adapter_weights(path)
        try:
            self.add_adapter(name, config)
        except ConfigError as exc:  # e.g. its target_modules are not layers of this base
            raise AdapterError(f"{path}: {exc}. Was it trained on another base model?") from None
        try:
            self.load_adapter_state_dict(name, state, source=str(path))
        except AdapterError:
            self.delete_adapter(name)
            raise
        return read_sidecar(path)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: str | None = None,
        name: str = "default",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> tuple["AdaptedModel", Any]:
        """Load the adapter at `path` onto its recorded base (or `base`); returns (model, tokenizer).

        The base is the one the run trained: a causal / seq2seq LM, or for `task: embedding | classification`
        the bare encoder or the encoder with a fresh head seeded as in training; an adapter trained with added
        tokens grows the base's embeddings to its own tokenizer. (artifacts.load_artifact, which every verb
        uses, loads adapters through here.)"""
        _, raw = read_adapter_config(path)
        base = base or raw.get("base_model_name_or_path")
        if not base:
            raise AdapterError(f"{path}: adapter_config.json records no base_model_name_or_path; pass the base model (--model)")
        model, tokenizer = _load_base(base, read_sidecar(path), dtype, device)
        tokenizer = resize_for_adapter(model, tokenizer, path)
        adapted = cls(model)
        adapted.load_adapter(path, name=name)
        adapted.to(device)
        return adapted, tokenizer


ENCODER_TASKS = ("embedding", "classification")


def _load_base(name: str, meta: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> tuple[nn.Module, Any]:
    """The base an adapter was trained on: a causal / seq2seq LM, or for an encoder task's adapter the bare
    encoder or the encoder with a fresh head, seeded as in training (the "before" of its scores)."""
    task = meta.get("task")
    if task not in ENCODER_TASKS:
        return load_model(name, dtype=dtype, device=device)
    labels = meta.get("labels") or []
    torch.manual_seed(int(((meta.get("run_config") or {}).get("train") or {}).get("seed", 0)))
    return load_encoder(name, len(labels) if task == "classification" else None, dtype=dtype, device=device)


def resize_for_adapter(model: nn.Module, tokenizer: Any, path: str | Path) -> Any:
    """An adapter trained with added tokens carries its tokenizer: grow the base's embeddings (and an untied
    head) to it, so the saved embedding rows fit. Returns the tokenizer to use."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        return tokenizer
    tokenizer = load_tokenizer(str(path))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer


def _param_count(param: torch.Tensor) -> int:
    """Weights a tensor stands for: a bitsandbytes 4-bit tensor packs two per byte of storage (as PEFT counts)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class (decides which PeftModel class loads it).

    None (plain `PeftModel`, as PEFT's ViT and Whisper examples) for models that read pixels or audio
    features: PEFT's task classes call the base with `input_ids`."""
    name = type(model).__name__
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration", "Seq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def _belongs_to(key: str, name: str) -> bool:
    """Is state/parameter `key` part of adapter `name`? (`...lora_A.<name>.weight`, or `...adaption_gate.<name>`)"""
    return any(f".{attr}.{name}." in key or key.endswith(f".{attr}.{name}") for attr in adapter_containers())


def adapter_containers() -> set[str]:
    """Names of the per-adapter containers of every adapter layer class (lora_A, modules_to_save...)."""
    seen, stack = set(), [AdapterLayerMixin]
    while stack:
        cls = stack.pop()
        seen.update(cls.adapter_attrs)
        stack.extend(cls.__subclasses__())
    return seen


def _strip_adapter_name(key: str, name: str) -> str:
    """`x.lora_A.default.weight` -> `x.lora_A.weight`; `head.modules_to_save.default.weight` -> `head.weight`."""
    key = key.replace(f".modules_to_save.{name}.", ".")
    for attr in adapter_containers():
        key = key.replace(f".{attr}.{name}.", f".{attr}.")
        if key.endswith(f".{attr}.{name}"):  # a ParameterDict entry: `...adaption_gate.<name>` -> `...adaption_gate`
            key = key[: -len(name) - 1]
    return key


def _keyword_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """forward(ids, ...) and forward(input_ids=ids, ...) alike, for adapters that rewrite the inputs."""
    if len(args) > 1:
        raise AdapterError("pass the model's inputs by keyword (input_ids=..., attention_mask=...)")
    return {"input_ids": args[0], **kwargs} if args else dict(kwargs)


def read_adapter_config(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(peftkit method config, raw adapter_config.json) for the adapter folder at `path`."""
    path = Path(path)
    file = path / CONFIG_NAME
    if path.is_file():
        raise AdapterError(f"{path}: is a file; give the adapter's folder (the one holding {CONFIG_NAME})")
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter folder; {TRAIN_WROTE}")
    if not file.is_file():
        raise AdapterError(f"{path}: not an adapter folder (no {CONFIG_NAME}); {TRAIN_WROTE}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file}: not valid JSON ({exc}); save the adapter again") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{file}: expected a JSON object; save the adapter again")
    peft_type = raw.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{file}: peft_type {peft_type!r} is not supported; supported: {', '.join(PEFT_TYPES)}")
    try:
        config = PEFT_TYPES[peft_type].from_peft_config(raw)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{file}: invalid values ({exc})") from None
    return config, raw


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from adapter_model.safetensors, or an old adapter_model.bin through weights_only loading."""
    path = Path(path)
    st, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{st}: unreadable or truncated safetensors file ({exc}); copy or save it again") from None
    if legacy.is_file():
        try:
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise AdapterError(
                f"{legacy}: refused: the pickle holds more than plain tensors (it could run code when loaded) "
                f"or is damaged ({str(exc).splitlines()[0]}). Convert it to safetensors in a trusted environment."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{legacy}: expected a mapping of tensor names to tensors")
        return state
    raise AdapterError(f"{path}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in the adapter folder; "
                       "re-save the adapter (peftkit train, or PEFT's save_pretrained)")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    file = Path(path) / SIDECAR_NAME
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file}: not valid JSON ({exc}); save the adapter again") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{file}: expected a JSON object; save the adapter again")
    return meta


def attach(model: nn.Module, config: Any, name: str = "default") -> AdaptedModel:
    """Freeze `model` and attach a new adapter in one call (returns the wrapping AdaptedModel)."""
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    adapted.add_adapter(name, config)
    return adapted


__all__ = [
    "AdaptedModel",
    "attach",
    "format_trainable",
    "read_adapter_config",
    "read_adapter_weights",
    "read_sidecar",
]

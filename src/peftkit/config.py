"""Typed run configuration: YAML in, nested dataclasses out, every error reported at once.

Example:
    >>> cfg = load_config(None, overrides=["train.epochs=1", "lora.r=8"])
    >>> cfg.lora.r
    8
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError

METHODS = ("lora", "qlora", "prompt_tuning", "prefix_tuning", "bottleneck", "selective", "full")


@dataclass
class DataConfig:
    """Where the examples come from and how they become prompts and targets."""

    dataset: str | None = "aclsum/outcome"
    """A built-in dataset (`aclsum/outcome`, `aclsum/challenge`, `aclsum/approach`), or null to use files."""
    train: str | None = None
    """Training file (.jsonl, .json, .csv, .parquet) or a `datasets` folder saved with save_to_disk."""
    validation: str | None = None
    """Validation file; when absent, `val_ratio` of the training rows are held out."""
    test: str | None = None
    """Test file; when absent, `test_ratio` of the training rows are held out."""
    prompt: str = "prompt"
    """Column holding the input text, or a template over the columns such as `"{title}\\n{abstract}"`."""
    response: str = "response"
    """Column holding the target text (loss is computed on it)."""
    template: str | None = None
    """Prompt template name from the built-in templates (e.g. `summarize`), or null for the dataset's default."""
    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """System message for chat templates; null keeps the tokenizer's default."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (default: response tokens only)."""
    max_length: int = 512
    """Longest tokenized example; longer prompts are truncated from the left, keeping the response."""
    val_ratio: float = 0.1
    """Fraction of training rows held out for validation when no validation file is given."""
    test_ratio: float = 0.1
    """Fraction of training rows held out for testing when no test file is given."""
    max_train_examples: int | None = None
    """Use at most this many training examples (after shuffling with the seed)."""


@dataclass
class LoraConfig:
    """Low-rank adapters beside chosen linear layers: W x + (alpha / r) * B A dropout(x)."""

    r: int = 16
    """Rank of the update (trainable parameters per layer: r * (in + out))."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input path."""
    target_modules: Union[list[str], str, None] = None
    """Module names (exact or suffix), a regex string, `all-linear`, or null for the architecture's q/v default."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully and saved with the adapter (e.g. a classification head `score`)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Initialisation of A (B is always zero, so a fresh adapter changes nothing)."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: float = 2
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, whatever `epochs` says."""
    batch_size: int = 8
    """Examples per optimizer step."""
    lr: float = 2.0e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay on trainable parameters."""
    warmup_ratio: float = 0.05
    """Fraction of steps with a linear warm-up before the cosine decay."""
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 frozen weights + autocast where the hardware supports it (auto), or force one."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`..."""
    save_every: int = 50
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass
class GenerateConfig:
    """Decoding used for samples after training, `peftkit generate` and evaluation."""

    max_new_tokens: int = 60
    """Most tokens generated per prompt."""
    num_samples: int = 3
    """Test prompts shown with base vs tuned answers after training (0: none)."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (with do_sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with do_sample)."""


@dataclass
class RunConfig:
    """A whole run: `peftkit train CONFIG.yaml`."""

    model: str = "smollm2-135m"
    """A built-in name (`smollm2-135m`), a local transformers folder, or a Hugging Face Hub id."""
    method: Literal["lora", "qlora", "prompt_tuning", "prefix_tuning", "bottleneck", "selective", "full"] = "lora"
    """The fine-tuning method."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    output_dir: str = "runs/default"
    """Folder for the adapter, checkpoints and metrics."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, collecting every error with its dotted path.


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the value (ints accepted for floats)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping of keys, got {value!r}")
            return tp()
        return _build(tp, value, path, errors)
    if origin is Literal:
        if value not in get_args(tp):
            hint = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{path}: {value!r} is not one of {_type_name(tp)}{did}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            trial: list[str] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return value
        return [_coerce(v, get_args(tp)[0], f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            errors.append(f"{path}: expected null")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        errors.append(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    if not isinstance(value, tp):
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], path: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else f" (valid keys: {', '.join(names)})"
            errors.append(f"{where}: unknown key{did}")
            continue
        kwargs[key] = _coerce(value, hints[key], where, errors)
    return cls(**kwargs)


def _check_values(cfg: RunConfig, errors: list[str]) -> None:
    """Ranges the types cannot express."""
    checks = [
        (cfg.lora.r >= 1, "lora.r", "must be at least 1 (typical: 4-64)"),
        (cfg.lora.alpha > 0, "lora.alpha", "must be positive (typical: r or 2*r)"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (cfg.train.epochs > 0, "train.epochs", "must be positive"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps", "must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (cfg.train.lr > 0, "train.lr", "must be positive (LoRA: 1e-4 to 1e-3; full: 1e-5 to 5e-5)"),
        (cfg.train.weight_decay >= 0, "train.weight_decay", "must be non-negative"),
        (0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
        (cfg.train.max_grad_norm >= 0, "train.max_grad_norm", "must be non-negative (0 disables clipping)"),
        (cfg.train.save_every >= 0, "train.save_every", "must be non-negative (0: only at the end)"),
        (cfg.train.log_every >= 1, "train.log_every", "must be at least 1"),
        (cfg.data.max_length >= 8, "data.max_length", "must be at least 8 tokens"),
        (0 <= cfg.data.val_ratio < 1, "data.val_ratio", "must be in [0, 1)"),
        (0 <= cfg.data.test_ratio < 1, "data.test_ratio", "must be in [0, 1)"),
        (cfg.data.val_ratio + cfg.data.test_ratio < 1, "data", "val_ratio + test_ratio must be below 1"),
        (cfg.generate.max_new_tokens >= 1, "generate.max_new_tokens", "must be at least 1"),
        (cfg.generate.num_samples >= 0, "generate.num_samples", "must be non-negative"),
        (cfg.generate.temperature > 0, "generate.temperature", "must be positive"),
        (0 < cfg.generate.top_p <= 1, "generate.top_p", "must be in (0, 1]"),
    ]
    for ok, key, message in checks:
        if not ok:
            errors.append(f"{key}: {message}")
    if cfg.data.dataset is None and cfg.data.train is None:
        errors.append("data: give either `dataset` (e.g. aclsum/outcome) or a `train` file")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=1` -> (["train", "epochs"], 1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.epochs=1")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise ConfigError(f"--set {text!r}: the key is empty; expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, method:, ...)")
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict; raise one ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _build(RunConfig, raw, "", errors)
    if not errors:
        _check_values(cfg, errors)
    if errors:
        listing = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n{listing}")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return config_from_dict(raw, source=str(path) if path else "defaults")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field, for `peftkit config --help`-style listings."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs

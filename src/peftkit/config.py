"""Typed run configuration: YAML in, nested dataclasses out, every error reported at once.

Example:
    >>> cfg = load_config(None, overrides=["train.epochs=1", "lora.r=8"])
    >>> cfg.lora.r
    8
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError



@dataclass
class MixtureEntry:
    """One task of a multi-task mixture (`data.mixture`); unset keys take the `data.*` value."""

    dataset: str | None = None
    """A built-in dataset (e.g. `aclsum/challenge`); or give `train` (and optionally validation/test) files."""
    train: str | None = None
    """Training file or `datasets` folder of this task."""
    validation: str | None = None
    """Validation file of this task (else held out by `data.val_ratio`)."""
    test: str | None = None
    """Test file of this task (else held out by `data.test_ratio`)."""
    prompt: str | None = None
    """Prompt column or template over the columns (default: `data.prompt`)."""
    response: str | None = None
    """Response column (default: `data.response`)."""
    template: str | None = None
    """This task's own template (built-in name or literal); default: the dataset's built-in phrasings."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames for this task's files (default: `data.columns`)."""
    weight: float = 1.0
    """Examples per epoch relative to the task's size: 1.0 all once, 0.5 a seeded half, 2.0 each twice."""
    name: str | None = None
    """Name in logs and counts (default: the dataset name or the file's stem)."""


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
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping {name the template / shape reads: column in the file}, e.g. `{abstract: body, messages: conversations}`."""
    mixture: list[MixtureEntry] = field(default_factory=list)
    """Several tasks trained together, each with its own template and a `weight`; replaces `dataset` / `train`."""
    packing: bool = False
    """Pack several examples per sequence of `max_length` (block-diagonal attention, position ids restart)."""
    add_special_tokens: list[str] = field(default_factory=list)
    """New special tokens: embeddings are resized and the changed embedding / head rows saved with the adapter."""


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
    deterministic: bool = False
    """Bit-reproducible GPU runs: deterministic kernels only (`torch.use_deterministic_algorithms`), cuBLAS' fixed
    workspace, no cuDNN autotuning; slower. CPU runs are reproducible without it (README: Determinism)."""
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
    padding_free: bool = True
    """Run each micro-batch as one row of concatenated examples with per-example attention (no padding,
    no mask) where the model allows it (Llama, Mistral, Qwen families with SDPA attention, token-wise
    methods); elsewhere, padded batches."""
    micro_batch_size: int | None = None
    """Examples per forward/backward (gradient accumulation); null: the whole batch (per process) at once."""
    eval_every: int = 0
    """Also evaluate on validation every N optimizer steps (0: at the end of each epoch only)."""
    select_by: Literal["val_loss", "rougeL"] = "val_loss"
    """Validation score that picks the best checkpoint: loss, or ROUGE-L F1 of greedy generations."""
    load_best: bool = False
    """Save the best validation checkpoint (not the last step) as the final adapter."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement (0: never stop early)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep (older ones are deleted)."""
    distributed: Literal["auto", "ddp", "fsdp", "none"] = "auto"
    """Under torchrun: `auto`/`ddp` replicate (DDP), `fsdp` shards (FSDP2); `none` refuses several processes."""
    init_adapter: str | None = None
    """Start from an existing adapter folder (peftkit's or HF PEFT's) instead of a fresh one."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"] = "adamw"
    """AdamW, or bitsandbytes' 8-bit / paged variants (paged needs CUDA: elsewhere the unpaged one, with a note)."""


@dataclass
class EmbeddingConfig:
    """Sentence embeddings for retrieval (`task: embedding`): a contrastive loss over (query, passage) pairs, each
    query's own passage the positive and the other passages of the batch its negatives."""

    query: str = "query"
    """Column holding the query text (files; the built-in aclsum tasks use a summary sentence)."""
    passage: str = "passage"
    """Column holding the passage the query should retrieve (files; aclsum: the paper's abstract)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Sentence vector: the mask-weighted mean of the last hidden states (sentence-transformers' MiniLM), or the first token's."""
    scale: float = 20.0
    """Cosine similarities are multiplied by this before the softmax (1 / temperature; sentence-transformers uses 20)."""
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Cut-offs k of the recall@k reported beside MRR and nDCG@10."""


@dataclass
class ClassificationConfig:
    """Sequence classification (`task: classification`): LoRA on the encoder plus a fully trained head."""

    text: str = "text"
    """Column holding the text to classify (files; the built-in `aclsum/aspects` uses a summary sentence)."""
    label: str = "label"
    """Column holding the class name (files; `aclsum/aspects`: challenge, approach or outcome)."""
    labels: list[str] = field(default_factory=list)
    """Class names in head order; empty: the sorted distinct labels of the training rows."""


@dataclass
class PreferenceConfig:
    """Preference tuning (`objective: dpo | orpo`): pairs of a prompt, a chosen and a rejected answer (train/preference.py)."""

    beta: float = 0.1
    """DPO: how far the tuned model may move from the reference (lower: further); IPO: its regularisation tau."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO's loss on the log-ratio margin: sigmoid (the DPO paper) or ipo (squared, per-token log-ratios)."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term against the chosen answer's NLL."""
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen answer (0: none)."""
    chosen: str = "chosen"
    """Column holding the preferred answer (text, or chat messages after the prompt turns)."""
    rejected: str = "rejected"
    """Column holding the dispreferred answer (same shape as `chosen`)."""


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
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already in the text by this (1.0: off; 1.1-1.3 curbs loops)."""
    no_repeat_ngram_size: int = 0
    """Never generate the same N-gram twice (0: off)."""


@dataclass
class RunSettings:
    """A whole run (`peftkit train CONFIG.yaml`) without its method sections: RunConfig adds one field per
    section the method registry declares (`lora:`, `quant:`, `prompt_tuning:`, ...)."""

    model: str = "smollm2-135m"
    """A built-in name (`smollm2-135m`, `all-minilm-l6-v2`), a local transformers folder, or a Hugging Face Hub id."""
    task: Literal["generation", "embedding", "classification"] = "generation"
    """What the model learns: text generation (causal or seq2seq LM), sentence embeddings for retrieval
    (contrastive, see `embedding:`), or sequence classification (LoRA + a trained head, see `classification:`)."""
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """What `task: generation` optimises: sft (cross-entropy on the responses), or a preference loss on
    prompt / chosen / rejected pairs, dpo or orpo (see `preference:`)."""
    method: str = "lora"
    """The fine-tuning method: one of the registry's (`lora`, `qlora`, ..., `full`; see methods/registry.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    """Pairs, pooling and loss of `task: embedding`."""
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    """Columns and classes of `task: classification`."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Loss and columns of `objective: dpo | orpo`."""
    output_dir: str = "runs/default"
    """Folder for the adapter, checkpoints and metrics."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def run_config_class() -> type:
    """RunConfig: RunSettings plus a section per registry entry, and `method` limited to the registry's names.

    Built on first use, so `import peftkit.config` stays free of torch (the registry imports the methods'
    layers); `RunConfig` and the method sections' classes are read through this module's `__getattr__`.
    """
    from .methods.registry import METHODS, SECTIONS  # on first use: importing the registry loads torch

    fields: list[Any] = [("method", Literal[tuple(METHODS)], field(default="lora"))]  # type: ignore[valid-type]
    fields += [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()]
    cls = dataclasses.make_dataclass("RunConfig", fields, bases=(RunSettings,))
    cls.__module__, cls.__doc__ = __name__, "A whole run: `peftkit train CONFIG.yaml`."
    return cls


def __getattr__(name: str) -> Any:
    """`RunConfig`, `PACKABLE_METHODS` and the method sections' classes (`LoraConfig`...), from the registry."""
    if name == "RunConfig":
        return run_config_class()
    from .methods.registry import SECTIONS, packable_methods

    if name == "PACKABLE_METHODS":
        return packable_methods()
    classes = {cls.__name__: cls for cls in SECTIONS.values()}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, collecting every error with its dotted path.


PLAIN_TYPE_NAMES = {float: "a number", int: "a whole number", str: "text", bool: "true or false"}
"""How error messages name scalar types: a newcomer reads "expected a number", not "expected float"."""


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
    return PLAIN_TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


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
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return value
        key_tp, value_tp = get_args(tp)
        return {_coerce(k, key_tp, path, errors): _coerce(v, value_tp, f"{path}.{k}", errors) for k, v in value.items()}
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
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
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
        before = len(errors)
        coerced = _coerce(value, hints[key], where, errors)
        if len(errors) == before or dataclasses.is_dataclass(hints[key]):  # a mistyped field keeps its default,
            # so the range checks below still run on every other field
            kwargs[key] = coerced
    return cls(**kwargs)


def _check_values(cfg: RunConfig, errors: list[str]) -> None:
    """Ranges the types cannot express."""
    checks = [
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
        (all(m.weight > 0 for m in cfg.data.mixture), "data.mixture", "every weight must be positive"),
        (all((m.dataset is None) != (m.train is None) for m in cfg.data.mixture), "data.mixture",
         "each entry needs exactly one of `dataset` (built-in) or `train` (a file)"),
        (cfg.train.micro_batch_size is None or cfg.train.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1"),
        (cfg.train.eval_every >= 0, "train.eval_every", "must be non-negative (0: each epoch)"),
        (cfg.train.early_stopping_patience >= 0, "train.early_stopping_patience", "must be non-negative (0 disables)"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1 (resume needs one)"),
        (cfg.generate.max_new_tokens >= 1, "generate.max_new_tokens", "must be at least 1"),
        (cfg.generate.num_samples >= 0, "generate.num_samples", "must be non-negative"),
        (cfg.generate.temperature > 0, "generate.temperature", "must be positive"),
        (0 < cfg.generate.top_p <= 1, "generate.top_p", "must be in (0, 1]"),
        (cfg.generate.repetition_penalty > 0, "generate.repetition_penalty", "must be positive (1.0: off)"),
        (cfg.generate.no_repeat_ngram_size >= 0, "generate.no_repeat_ngram_size", "must be non-negative (0: off)"),
    ]
    for ok, key, message in checks:
        if not ok:
            errors.append(f"{key}: {message}")
    _check_method(cfg, errors)
    if cfg.task != "generation":
        _check_encoder_task(cfg, errors)
    if cfg.objective != "sft":
        _check_preference(cfg, errors)
    if cfg.data.dataset is None and cfg.data.train is None and not cfg.data.mixture:
        errors.append("data: give either `dataset` (e.g. aclsum/outcome) or a `train` file")


def _check_method(cfg: Any, errors: list[str]) -> None:
    """Each section's own ranges, and what the chosen method's capabilities rule out."""
    from .methods.registry import METHODS, packable_methods  # loaded with RunConfig already

    for method in METHODS.values():
        for name in method.sections:
            errors.extend(method.check(getattr(cfg, name)) if method.check else [])
    method = METHODS.get(cfg.method)
    if method is None:
        return  # the type check already said which methods there are
    if cfg.data.packing and not method.capabilities.packable:
        errors.append(f"data.packing: method {cfg.method!r} cannot use packed sequences "
                      f"(packable: {', '.join(packable_methods())}); set data.packing: false")
    refusal = method.capabilities.gradient_checkpointing
    if refusal and cfg.train.gradient_checkpointing:
        errors.append(f"train.gradient_checkpointing: {refusal}; set train.gradient_checkpointing: false")
    if cfg.data.add_special_tokens and not method.capabilities.added_tokens:
        able = [name for name, m in METHODS.items() if m.capabilities.added_tokens]
        errors.append(f"data.add_special_tokens: the resized embeddings must be saved with the adapter, and method "
                      f"{cfg.method!r} cannot; use {' or '.join(able)}")


PREFERENCE_DATASETS = ("aclsum/outcome-preference",)
"""Built-in pair datasets of `objective: dpo | orpo`."""


def _check_preference(cfg: RunConfig, errors: list[str]) -> None:
    """`objective: dpo | orpo`: a generation task on one pair dataset, with a positive beta."""
    p = cfg.preference
    if p.beta <= 0:
        errors.append(f"preference.beta: must be positive, got {p.beta} (DPO's usual range: 0.05 to 0.5)")
    if p.orpo_lambda < 0:
        errors.append(f"preference.orpo_lambda: must be non-negative, got {p.orpo_lambda} (ORPO's usual: 0.1)")
    if p.sft_weight < 0:
        errors.append(f"preference.sft_weight: must be non-negative, got {p.sft_weight} (0: no extra NLL term)")
    if cfg.task != "generation":
        errors.append(f"objective: {cfg.objective} tunes a generation model; remove it, or set task: generation")
    if cfg.data.mixture or cfg.data.packing:
        errors.append(f"data: objective {cfg.objective} reads one pair dataset unpacked; remove data.mixture / data.packing")
    if cfg.train.select_by != "val_loss":
        errors.append(f"train.select_by: objective {cfg.objective} keeps the best weights by the validation pair loss; "
                      "set train.select_by: val_loss")
    if cfg.data.train is None and cfg.data.dataset not in PREFERENCE_DATASETS:
        errors.append(f"data.dataset: {cfg.data.dataset!r} has no answer pairs; objective {cfg.objective} needs "
                      f"{' or '.join(PREFERENCE_DATASETS)}, or a `train` file of prompt / chosen / rejected rows")


ENCODER_DATASETS = {
    "embedding": ("aclsum/aspects", "aclsum/outcome", "aclsum/challenge", "aclsum/approach"),
    "classification": ("aclsum/aspects",),
}
"""Built-in datasets of the encoder tasks: a summary sentence (of every aspect, or of one) and its paper's abstract;
for classification, a summary sentence labelled by its aspect."""


def _check_encoder_task(cfg: RunConfig, errors: list[str]) -> None:
    """`task: embedding | classification` train LoRA in one process, on whole batches (in-batch negatives)."""
    valid = ENCODER_DATASETS[cfg.task]
    if cfg.data.dataset is not None and cfg.data.dataset not in valid:
        hint = difflib.get_close_matches(cfg.data.dataset, valid, n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        errors.append(f"data.dataset: {cfg.data.dataset!r} is not a built-in dataset of task {cfg.task}{did}; "
                      f"use {', '.join(valid)}, or give `train` files")
    if cfg.method != "lora":
        errors.append(f"method: task {cfg.task} trains with method lora (DoRA / rsLoRA through lora.*), not {cfg.method!r}")
    if cfg.train.micro_batch_size is not None:
        errors.append(f"train.micro_batch_size: task {cfg.task} runs each batch whole (in-batch negatives); remove it")
    if cfg.train.load_best or cfg.train.early_stopping_patience or cfg.train.select_by != "val_loss":
        errors.append(f"train: task {cfg.task} logs validation scores each epoch and keeps the last step; "
                      "remove load_best / early_stopping_patience / select_by")
    if cfg.data.mixture or cfg.data.packing:
        errors.append(f"data: task {cfg.task} reads one dataset unpacked; remove data.mixture / data.packing")
    if cfg.embedding.scale <= 0:
        errors.append("embedding.scale: must be positive (typical: 20)")
    if not cfg.embedding.recall_at or min(cfg.embedding.recall_at) < 1:
        errors.append("embedding.recall_at: give cut-offs of at least 1, e.g. [1, 5, 10]")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=1` -> (["train", "epochs"], 1); the value is parsed as YAML, except that a text field
    whose value YAML reads as something else keeps the literal text (`data.prompt={question}` is the
    template "{question}", not a mapping)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.epochs=1")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise ConfigError(f"--set {text!r}: the key is empty; expected dotted.key=value")
    keys = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    annotation = field_annotation(keys)
    if annotation is not None and _fits("text", annotation) and not _fits(value, annotation):
        return keys, raw
    return keys, value


def field_annotation(keys: list[str]) -> Any:
    """The type annotation of the RunConfig field at a dotted path, or None when there is no such field."""
    annotation: Any = run_config_class()
    for key in keys:
        if not dataclasses.is_dataclass(annotation):
            return None
        hints = typing.get_type_hints(annotation)
        if key not in hints:
            return None
        annotation = hints[key]
    return annotation


def _fits(value: Any, annotation: Any) -> bool:
    trial: list[str] = []
    _coerce(value, annotation, "", trial)
    return not trial


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
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; give the YAML file itself")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the YAML there "
            "(indent with spaces, not tabs; quote values that hold ': ' or ' #')"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, method:, ...)")
    return raw


FILE_KEYS = ("train", "mixture")
"""`data` keys that name the run's own files; given, they replace the built-in `data.dataset`."""


def config_from_dict(raw: dict[str, Any], source: str = "config", overridden: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a plain dict; raise one ConfigError listing every problem (those of `overridden` dotted keys
    under the heading `--set`)."""
    errors: list[str] = []
    cfg = _build(run_config_class(), files_replace_dataset(raw, errors), "", errors)
    _check_values(cfg, errors)
    if errors:
        from_set = [e for e in errors if any(e.startswith(k + ":") or e.startswith(k + ".") or e.startswith(k + "[") for k in overridden)]
        groups = [(source, [e for e in errors if e not in from_set]), ("--set", from_set)]
        raise ConfigError("\n".join(f"{name}: {len(group)} problem(s):\n" + "\n".join(f"  - {e}" for e in group)
                                     for name, group in groups if group))
    return cfg


def files_replace_dataset(raw: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """`raw` with `data.dataset` null when `data.train` or `data.mixture` is given, so the run's header and
    config.yaml name the data that trains; naming a built-in dataset beside them is an error."""
    data = raw.get("data")
    if not isinstance(data, dict) or not any(data.get(key) for key in FILE_KEYS):
        return raw
    if data.get("dataset") is not None:
        errors.append(f"data.dataset: {data['dataset']!r} and `data.train` / `data.mixture` are both given; the files "
                      "replace the built-in dataset, so remove data.dataset (or the files)")
    return {**raw, "data": {**data, "dataset": None}}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides; files given by
    an override replace the config's built-in dataset."""
    raw = read_yaml(path) if path is not None else {}
    overridden = []
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
        overridden.append(".".join(keys))
    data = raw.get("data")
    if isinstance(data, dict) and any(f"data.{key}" in overridden and data.get(key) for key in FILE_KEYS) and "data.dataset" not in overridden:
        data.pop("dataset", None)
    return config_from_dict(raw, source=str(path) if path else "--set", overridden=overridden)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field, for `peftkit config --help`-style listings (RunConfig: its
    settings' docstrings, and each method section described by the method that declares it)."""
    import ast
    import inspect

    if cls is run_config_class():
        return {**field_docs(RunSettings), **_section_docs()}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def _section_docs() -> dict[str, str]:
    """`lora` -> "Low-rank adapters ... (`method: lora`)", from the registry entry that declares the section."""
    from .methods.registry import METHODS

    return {name: f"{m.description} (`method: {m.name}`)" for m in METHODS.values() for name in m.sections}

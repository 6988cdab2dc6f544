"""One base model, many adapters: the registry, the request queue and the decode thread.

A single worker thread owns the model. It takes batches from the queue and decodes them
(`decode.decode_batch`); adapter loads, unloads and combinations take the same lock, so they
happen between batches. With `merge=True` a single adapter is folded into the base weights
(zero overhead, and nothing else can be served).

Example:
    >>> engine = Engine.from_paths("smollm2-135m", {"outcome": "runs/outcome/adapter"})
    >>> engine.start()
    >>> seq = engine.sequence("outcome", engine.encode_completion("outcome", "We study ..."), SamplingParams(temperature=0))
    >>> engine.submit(seq)
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence as Seq

from torch import nn

from ..adapters import CONFIG_NAME, AdaptedModel
from ..artifacts import artifact_kind, load_artifact, resize_for_adapter, saved_format
from ..combine import Combination, combine_adapters
from ..data.templates import PromptFormat
from ..errors import AdapterError, ModelError, PeftkitError
from ..models import BUILTIN_MODELS, is_seq2seq
from .batching import Scheduler
from .decode import RunningBatch, Sequence
from .sampling import SamplingParams
from .prompts import RAW_FORMAT, chat_ids, completion_ids
from .routing import RowRouting, enable_row_routing, routable
from .security import check_adapter_files, confined_adapter_dir
from .settings import ServeSettings

log = logging.getLogger(__name__)

MIXED = "__mixed__"
"""Batch group of the base and every row-routable adapter."""


class UnknownModel(AdapterError):
    """A request names a model that is not served (answered with 404)."""


class Conflict(AdapterError):
    """A change the server's current state does not allow: name taken, adapter limit, merged model (409)."""


@dataclass
class ServedAdapter:
    """An adapter the server answers for."""

    format: PromptFormat
    source: str
    routable: bool


class Engine:
    """The served base model, its adapters, and the thread that decodes batches."""

    def __init__(self, model: nn.Module, tokenizer: Any, base_name: str, settings: ServeSettings | None = None) -> None:
        if is_seq2seq(model):
            raise ModelError("peftkit serve runs decoder-only (causal LM) models; this one is encoder-decoder")
        self.settings = settings or ServeSettings()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.base_source = base_name
        """Where the base came from (built-in name, folder or Hub id), shown as `root` on /v1/models."""
        self.merged: str | None = None
        self.adapted: AdaptedModel | None = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
        self.model: nn.Module = self.adapted
        self.model.eval()
        self.adapters: dict[str, ServedAdapter] = {}
        self.routing: RowRouting | None = None
        self.queue = Scheduler(self.settings.max_batch_size, self.settings.max_wait_ms, self.settings.batching == "continuous")
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.stats = {"prefills": 0, "steps": 0, "sequences": 0, "largest_batch": 0, "mixed_steps": 0, "cancelled": 0}
        """Counters shown on /health: prefill passes, decode steps, sequences, the most rows in a step, steps mixing
        adapters, sequences stopped early because their client left."""
        self._model_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.batch = self._new_batch(None)
        self._last_used: dict[str, float] = {}
        self._loading: dict[str, threading.Event] = {}
        self._loading_lock = threading.Lock()
        self._directory_lock = threading.Lock()
        self._load_failures: dict[str, PeftkitError] = {}

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_paths(
        cls, model: str, adapters: Mapping[str, str | Path], settings: ServeSettings | None = None, merge: bool = False,
        device: str = "auto", precision: str = "fp32", base_name: str | None = None,
    ) -> "Engine":
        """Load `model` and the named adapter folders (operator-given, so not confined to the adapter root)."""
        if merge and len(adapters) != 1:
            raise AdapterError(f"--merge serves exactly one adapter, {len(adapters)} given")
        base = load_artifact(None, model, device=device, precision=precision)
        engine = cls(base.model, base.tokenizer, base_name or served_name(model), settings)
        engine.base_source = model
        for name, path in adapters.items():
            engine.load_adapter(name, Path(path))
        if merge:
            engine.merge_only(next(iter(adapters)))
        return engine

    def merge_only(self, name: str) -> None:
        """Fold the one adapter into the base weights; afterwards only it is served."""
        if self.adapted is None or set(self.adapters) != {name}:
            raise AdapterError("merging needs exactly one loaded adapter")
        with self._model_lock:
            served = self.adapters[name]
            self.model = self.adapted.merge_and_unload(name)
            self.model.eval()
            self.adapted, self.routing, self.merged = None, None, name
            self.adapters = {name: ServedAdapter(served.format, served.source + " (merged)", True)}

    # -- adapters ------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return ([] if self.merged else [self.base_name]) + list(self.adapters)

    def _require_unmerged(self) -> AdaptedModel:
        if self.adapted is None:
            raise Conflict(f"the server runs adapter {self.merged!r} merged into the base (--merge); it cannot change adapters")
        return self.adapted

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise AdapterError(f"adapter name {name!r} must be a Python identifier (letters, digits, _)")
        if name == self.base_name or name in self.adapters:
            raise Conflict(f"a model named {name!r} is already served; unload it first or choose another name")
        if len(self.adapters) >= self.settings.max_adapters:
            raise Conflict(f"{len(self.adapters)} adapters are loaded, the limit is {self.settings.max_adapters}")

    def load_adapter(self, name: str, folder: Path) -> ServedAdapter:
        """Check and attach an adapter folder (safetensors only; every tensor's shape must fit the base)."""
        adapted = self._require_unmerged()
        check_adapter_files(folder)
        with self._model_lock:
            self._check_new_name(name)
            self.tokenizer = resize_for_adapter(adapted.model, self.tokenizer, folder)  # added tokens: grow the base
            meta = adapted.load_adapter(folder, name=name)  # checks keys, shapes and finiteness
            adapted.set_adapter(None)
            served = self._register(name, saved_format(meta), str(folder))
        log.info("adapter %r loaded from %s (%s)", name, folder, "mixed batches" if served.routable else "own batches")
        return served

    def unload_adapter(self, name: str) -> None:
        adapted = self._require_unmerged()
        with self._model_lock:
            if name not in self.adapters:
                raise UnknownModel(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
            adapted.delete_adapter(name)
            del self.adapters[name]
            self._last_used.pop(name, None)
            if self.routing is not None:
                self.routing.refresh()
        log.info("adapter %r unloaded", name)

    def combine(self, name: str, sources: Seq[str], weights: Seq[float], how: Combination, rank: int | None = None) -> ServedAdapter:
        """Serve a new adapter made from a weighted combination of loaded ones (prompt format of the first)."""
        adapted = self._require_unmerged()
        with self._model_lock:
            self._check_new_name(name)
            missing = [s for s in sources if s not in self.adapters]
            if missing:
                raise UnknownModel(f"no adapter named {missing[0]!r}; loaded: {', '.join(self.adapters) or 'none'}")
            combine_adapters(adapted, list(sources), list(weights), name, how=how, rank=rank)
            adapted.set_adapter(None)
            source = f"{how} of " + ", ".join(f"{w:g}*{s}" for s, w in zip(sources, weights))
            return self._register(name, self.adapters[sources[0]].format, source)

    def _register(self, name: str, fmt: PromptFormat, source: str) -> ServedAdapter:
        assert self.adapted is not None
        self.routing = enable_row_routing(self.adapted, self.routing)
        self.routing.refresh()
        served = ServedAdapter(fmt, source, routable(self.adapted, name))
        self.adapters[name] = served
        return served

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base); unknown names raise UnknownModel."""
        if model in self.adapters:
            self._last_used[model] = time.monotonic()
            return model
        if model == self.base_name and not self.merged:
            return None
        raise UnknownModel(f"model {model!r} is not served; available: {', '.join(self.model_names())}")

    # -- adapters on demand (--adapter-dir) -------------------------------------------------------
    def available_adapters(self) -> list[str]:
        """Adapter folders under --adapter-dir that requests may name (loaded on first use)."""
        root = self.settings.adapter_dir
        if root is None or not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.name.isidentifier() and (p / CONFIG_NAME).is_file())

    def ensure_adapter(self, model: str) -> None:
        """Load adapter `model` from --adapter-dir if it is not resident (evicting the least recently used one
        beyond --max-adapters). Requests for an adapter that is loading wait for that load and share its result."""
        root = self.settings.adapter_dir
        if root is None or model in self.adapters or (model == self.base_name and not self.merged):
            return
        if not model.isidentifier():
            raise UnknownModel(f"model {model!r} is not served; adapter names are identifiers (letters, digits, _)")
        with self._loading_lock:
            loading = self._loading.get(model)
            if loading is None:
                self._loading[model] = loading = threading.Event()
                owner = True
            else:
                owner = False
        if not owner:
            loading.wait(timeout=600)
            if model not in self.adapters:
                raise self._load_failures.get(model) or UnknownModel(f"adapter {model!r} could not be loaded")
            return
        try:
            with self._directory_lock:  # one on-demand load (and eviction) at a time
                self._load_from_dir(model, root)
            self._load_failures.pop(model, None)
        except PeftkitError as exc:
            self._load_failures[model] = exc
            raise
        finally:
            with self._loading_lock:
                del self._loading[model]
            loading.set()

    def _load_from_dir(self, name: str, root: Path) -> None:
        if not (root / name).exists():
            raise UnknownModel(f"model {name!r} is not served: no folder {name!r} under --adapter-dir; "
                               f"available: {', '.join(self.model_names() + self.available_adapters())}")
        folder = confined_adapter_dir(root, name)  # the folder-safety rules: no escape from the directory
        if artifact_kind(folder) != "adapter":
            raise AdapterError(f"{name}: a full model folder, not an adapter; --adapter-dir serves adapter folders")
        while len(self.adapters) >= self.settings.max_adapters:
            self._evict_least_recently_used()
        self.load_adapter(name, folder)
        self._last_used[name] = time.monotonic()

    def _evict_least_recently_used(self) -> None:
        """Unload the resident adapter used longest ago that no running or waiting request needs."""
        with self._model_lock:
            busy = {s.adapter for s in self.batch.seqs} | self.queue.adapters()
        idle = [name for name in self.adapters if name not in busy]
        if not idle:
            raise Conflict(f"all {len(self.adapters)} resident adapters (--max-adapters) are in use; retry shortly")
        victim = min(idle, key=lambda name: self._last_used.get(name, 0.0))
        log.info("adapter %r evicted (least recently used; --max-adapters %d)", victim, self.settings.max_adapters)
        self.unload_adapter(victim)

    # -- requests -------------------------------------------------------------------------------
    def _format(self, adapter: str | None) -> PromptFormat:
        return RAW_FORMAT if adapter is None else self.adapters[adapter].format

    def encode_completion(self, adapter: str | None, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return completion_ids(self.tokenizer, self._format(adapter), prompt)

    def encode_chat(self, adapter: str | None, messages: Seq[Mapping[str, str]]) -> list[int]:
        fmt = self._format(adapter) if adapter is not None else PromptFormat(chat=True)
        with self._tokenizer_lock:
            return chat_ids(self.tokenizer, fmt, messages)

    def decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def token_text(self, tokens: int | list[int]) -> str:
        """The text of a token (or of token ids), special tokens included (log-prob entries and echo show every token)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids for raw text (no template), as vLLM's /tokenize gives them."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; its events arrive through `seq.on_event` from the decode thread."""
        if self._worker is None:
            seq.fail(503, "the decode thread is not running (Engine.start(), or the app's lifespan, starts it)")
            return
        self.queue.put(seq, self.batch_group(seq))

    def batch_group(self, seq: Sequence) -> str | None:
        """Requests of one group can share a batch: the base and routable adapters mix, others stay alone."""
        served = self.adapters.get(seq.adapter) if seq.adapter is not None else None
        routed = seq.adapter is None or (served is not None and served.routable)
        return MIXED if routed and not self.merged else seq.adapter

    # -- the decode thread ----------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._stop.clear()
            self.queue.reopen()
            self._worker = threading.Thread(target=self._work, name="peftkit-decode", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, let the current step end (bounded), and fail everything running or queued with 503."""
        self._stop.set()
        self.queue.close()
        if self._worker is not None:
            self._worker.join(timeout=timeout)
            self._worker = None
        with self._model_lock:
            for seq in self.batch.seqs + self.queue.drain():
                if not seq.done:
                    seq.fail(503, "the server is shutting down")
            self.batch.clear()

    def _work(self) -> None:
        while not self._stop.is_set():
            self.iterate(timeout=0.5)

    def iterate(self, timeout: float = 0.0) -> None:
        """One scheduling round: drop rows whose client left, let waiting requests join, decode one step."""
        batch = self.batch
        can_join = batch.joinable or not batch.seqs
        group, joining = self.queue.admit(batch.group, len(batch) if can_join else self.settings.max_batch_size,
                                          self._fits, timeout if not batch.seqs else 0.0)
        with self._model_lock:
            try:
                self._count_left(self._retire_unservable())
                joining = [s for s in joining if self._servable(s)]
                if joining:
                    self._start_group(group)
                    self._count_join(joining)
                batch = self.batch
                with self._adapter_mode(batch.group):
                    if joining:
                        batch.join(joining)
                    if batch.seqs:
                        self._count_step(batch.seqs)
                        self._count_left(batch.step())
            except Exception as exc:  # a bug or an out-of-memory: report it to these requests and keep serving
                log.exception("decoding a batch of %d failed", len(batch) + len(joining))
                for seq in batch.seqs + joining:
                    if not seq.done:
                        seq.fail(500, f"generation failed: {type(exc).__name__}")
                batch.clear()

    def run_batch(self, seqs: list[Sequence]) -> None:
        """Decode these sequences together to their end, in the calling thread, in a batch of their own (tests, benchmarks)."""
        live = [s for s in seqs if self._servable(s)]
        if not live:
            return
        with self._model_lock:
            group = self.batch_group(live[0])
            batch = self._new_batch(group)
            self._count_join(live)
            with self._adapter_mode(group):
                batch.join(live)
                while batch.seqs:
                    self._count_step(batch.seqs)
                    batch.step()

    def _new_batch(self, group: Any) -> RunningBatch:
        """An empty batch for `group`: routed per row for the mixed group, one active adapter otherwise."""
        batch = RunningBatch(self.model, self.tokenizer.pad_token_id, self.eos_ids, self.decode,
                             self.routing if group == MIXED else None)
        batch.group = group
        return batch

    def _start_group(self, group: Any) -> None:
        """An empty running batch starts serving `group`."""
        if not self.batch.seqs:
            self.batch = self._new_batch(group)

    def _servable(self, seq: Sequence) -> bool:
        """False (and the sequence failed) when its adapter was unloaded after it was queued."""
        if seq.adapter is not None and seq.adapter not in self.adapters:
            seq.fail(404, f"adapter {seq.adapter!r} was unloaded before the request finished")
            return False
        return not seq.cancelled.is_set()

    def _retire_unservable(self) -> list[Sequence]:
        """Rows whose client left, or whose adapter was unloaded, leave before the next step."""
        for seq in self.batch.seqs:
            if not seq.done and seq.adapter is not None and seq.adapter not in self.adapters:
                self._servable(seq)
        return self.batch.retire()

    def _count_left(self, left: list[Sequence]) -> None:
        self.stats["cancelled"] += sum(1 for s in left if s.cancelled.is_set() and s.finish_reason in (None, "cancelled"))

    def _fits(self, extra: Seq[Sequence]) -> bool:
        return self.batch.footprint(extra) <= self.settings.kv_cache_tokens

    def _count_join(self, seqs: list[Sequence]) -> None:
        self.stats["prefills"] += 1
        self.stats["sequences"] += len(seqs)

    def _count_step(self, rows: list[Sequence]) -> None:
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self.stats["mixed_steps"] += len({s.adapter for s in rows}) > 1

    @contextmanager
    def _adapter_mode(self, group: Any) -> Iterator[None]:
        """A group of one non-routable adapter runs with that adapter active; mixed groups route per row."""
        if self.adapted is None or group in (None, MIXED) or group not in self.adapters:
            yield
            return
        self.adapted.set_adapter(group)
        try:
            yield
        finally:
            self.adapted.set_adapter(None)

    def check_prompt_ids(self, prompt_ids: Seq[int]) -> None:
        """A prompt must hold at least one token, each inside the vocabulary."""
        if not prompt_ids:
            raise PeftkitError("the prompt is empty (0 tokens); send at least one token")
        outside = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if outside is not None:
            raise PeftkitError(f"token id {outside} in the prompt is outside the vocabulary (0 to {self.vocab_size - 1})")

    def sequence(self, model: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A sequence for `model` (a served name), checked against the prompt and token limits."""
        adapter = self.resolve(model)
        limits = self.settings
        self.check_prompt_ids(prompt_ids)
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise PeftkitError(f"the prompt is {len(prompt_ids)} tokens, the limit is {limits.max_prompt_tokens}; shorten it")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise PeftkitError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of {self.context_length}"
            )
        if len(prompt_ids) + params.max_tokens > limits.kv_cache_tokens:
            raise PeftkitError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) is more than the server's KV-cache "
                f"budget of {limits.kv_cache_tokens} tokens (--kv-cache-tokens); lower max_tokens or shorten the prompt"
            )
        return Sequence(prompt_ids=prompt_ids, adapter=adapter, params=params)


def served_name(model: str) -> str:
    """The name requests use for a base: a built-in's own name, a local folder's name, or the Hub id."""
    if model in BUILTIN_MODELS:
        return model
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids


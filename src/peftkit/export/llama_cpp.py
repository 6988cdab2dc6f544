"""Exported GGUF files run in llama.cpp itself, through llama-cpp-python (the `llamacpp` extra).

Used by the export checks (tests marked slow, scripts/check_llama_cpp.py): token ids go in as ids,
so the comparison with peftkit is about the weights, not about two tokenizers.

Example:
    >>> llm, seconds = load_gguf("merged.gguf")
    >>> tokens, tokens_per_s = greedy(llm, prompt_ids, max_new_tokens=32, stop_ids={2})
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np


def load_gguf(path: str | Path, lora: str | Path | None = None, threads: int = 2, context: int = 1024,
              kv_cache_f32: bool = False) -> tuple[llama_cpp.Llama, float]:
    """(the model, seconds it took to load), with every position's logits kept; `lora`: a LoRA GGUF applied at load.

    llama.cpp keeps the attention keys and values in f16 by default; `kv_cache_f32` keeps them in f32,
    for comparisons at f32 precision."""
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_cache_f32 else {}
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=context, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False, **cache)
    return llm, time.perf_counter() - start


def logits(llm: llama_cpp.Llama, ids: Sequence[int]) -> np.ndarray:
    """Logits at every position of `ids`, (T, vocab), from a fresh context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: llama_cpp.Llama, ids: Sequence[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], float]:
    """(new token ids up to a stop id, decode tokens/s): argmax of llama.cpp's own logits, one token per step."""
    llm.reset()
    llm.eval(list(ids))
    new: list[int] = []
    start = time.perf_counter()
    while len(new) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        new.append(token)
        llm.eval([token])
    seconds = time.perf_counter() - start
    return new, len(new) / seconds if seconds > 0 else float("nan")

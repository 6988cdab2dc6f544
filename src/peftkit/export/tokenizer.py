"""A byte-level BPE tokenizer as GGUF metadata: vocabulary, token types, merges, special ids, chat template.

The keys and token types follow `_set_vocab_gpt2` / `get_vocab_base` in llama.cpp's
convert_hf_to_gguf.py. `tokenizer.ggml.pre` names the pre-tokenizer (the regex that splits text
before BPE): llama.cpp recognises a tokenizer by hashing how it encodes a fixed text, and so do we
for the few families exported here; a tokenizer that splits with byte-level BPE's own regex alone
is `gpt-2`.
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from typing import Any

import gguf

from ..errors import ExportError

log = logging.getLogger(__name__)

# convert_hf_to_gguf.py's `get_vocab_base_pre` text and the hashes of the families exported here
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
}


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's `tokenizer.json` as a dict; only byte-level BPE is exported."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; GGUF export needs one")
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    if spec["model"].get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ExportError(f"tokenizer model {spec['model'].get('type')} with decoder {decoder.get('type')} is not "
                          "exported; GGUF export supports byte-level BPE (SmolLM2, Qwen2, GPT-2, Llama 3)")
    return spec


def pre_tokenizer_name(tokenizer: Any, spec: dict[str, Any]) -> str:
    """llama.cpp's name for how this tokenizer splits text (see the module docstring)."""
    ids = tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)  # with special tokens, as llama.cpp hashes it
    known = PRE_TOKENIZER_HASHES.get(sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level BPE's own split is GPT-2's regex
    log.warning("pre-tokenizer %s is not one llama.cpp is known to match; writing 'default'", pre.get("type"))
    return "default"


def merges(spec: dict[str, Any]) -> list[str]:
    """BPE merges as "left right" strings (tokenizers writes pairs or strings, by version)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded to the model's embedding rows, and their llama.cpp token types."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(by_id)}, but the model has only {vocab_size} embedding rows; "
                          "resize the model's embeddings to the tokenizer (added tokens) before exporting")
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_bos(tokenizer: Any) -> bool:
    """Does encoding put the BOS token first (as the tokenizer behaves, not as its config claims)?"""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Every tokenizer key llama.cpp and transformers' GGUF loader read."""
    spec = tokenizer_json(tokenizer)
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec))
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

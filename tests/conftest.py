"""Shared fixtures: a tiny BPE tokenizer trained here, tiny Llama / GPT-2 / T5 / ViT / Whisper models from configs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "We propose a new method for summarization of scientific papers and show it works well.",
    "The results show that our model outperforms strong baselines on three benchmarks by a large margin.",
    "This paper studies the problem of low-resource machine translation with limited parallel data.",
    "Experiments demonstrate consistent gains in accuracy, recall and F1 over previous approaches.",
    "Summarize the outcome of the following paper abstract in one sentence. Outcome: Answer:",
    "It is very cold outside. It is cold outside. What did this paper find? Read the abstract below.",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast  # pad == eos, like SmolLM2: padding must be masked by length, never by id


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_config(kind: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, T5Config, ViTConfig, WhisperConfig

    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2, pad_token_id=2,
            bos_token_id=None,
        )
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, eos_token_id=2, bos_token_id=2, pad_token_id=2)
    if kind == "t5":
        return T5Config(
            vocab_size=vocab, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, pad_token_id=0,
            eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0,
        )
    if kind == "vit":  # 16x16 RGB images in 4x4 patches, 5 classes
        return ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, num_labels=5)
    if kind == "whisper":  # 8 mel bins x 32 frames (the encoder halves them to 16 positions)
        return WhisperConfig(
            vocab_size=vocab, num_mel_bins=8, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )
    raise ValueError(kind)


def build_model(kind: str, vocab: int, seed: int = 0):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSeq2SeqLM,
        AutoModelForSpeechSeq2Seq,
    )

    torch.manual_seed(seed)
    config = tiny_config(kind, vocab)
    classes = {"t5": AutoModelForSeq2SeqLM, "vit": AutoModelForImageClassification, "whisper": AutoModelForSpeechSeq2Seq}
    model = classes.get(kind, AutoModelForCausalLM).from_config(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny checkpoints saved as local folders, so `model: <folder>` works as for a user."""
    out = {}
    for kind in ("llama", "gpt2", "t5"):
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        build_model(kind, len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[kind] = folder
    return out


@pytest.fixture
def rows() -> list[dict[str, str]]:
    return [
        {"abstract": f"This paper studies problem {i}. We propose a method. Results show gains.", "summary": f"The method gives gains on problem {i}."}
        for i in range(24)
    ]


@pytest.fixture
def data_file(tmp_path, rows) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_config(model_dir: Path, data_file: Path, out: Path, **train):
    """A RunConfig dict for a fast run on a tiny model and a tiny jsonl file."""
    return {
        "model": str(model_dir),
        "data": {"dataset": None, "train": str(data_file), "template": "Summarize:\n\n{abstract}", "response": "summary",
                 "max_length": 128, "val_ratio": 0.125, "test_ratio": 0.125},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": 1, "batch_size": 4, "lr": 5e-3, "seed": 0, "save_every": 0, "warmup_ratio": 0.0, **train},
        "generate": {"max_new_tokens": 8, "num_samples": 2},
        "output_dir": str(out),
    }


SUBPROCESS_THREADS = 1
"""Torch threads of training subprocesses: on 2 shared cores a second OpenMP thread makes tiny steps
several times slower under load. In-process runs compared with them bit for bit use `torch_threads`."""


@contextmanager
def torch_threads(count: int = SUBPROCESS_THREADS) -> Iterator[None]:
    """Run torch with `count` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subprocess_env() -> dict[str, str]:
    """Environment for a training subprocess: offline, SUBPROCESS_THREADS threads."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(SUBPROCESS_THREADS)}


BF16_UNIT_ROUNDOFF = torch.finfo(torch.bfloat16).eps / 2
"""2^-8 ~ 3.9e-3: bf16 keeps 8 significant bits, so one rounding moves a value by at most this fraction.
Tests that compare two bf16 computations derive their tolerance from it (and say why in a comment)."""


def bf16_atol(reference: torch.Tensor, roundings: float) -> float:
    """`roundings` bf16 unit roundoffs of `reference`'s largest element: the absolute tolerance between two bf16
    computations of one tensor that round at different points (an element near zero carries the same absolute
    error as the largest, so the bound is absolute). Each test names the count it allows and what it measured."""
    return roundings * BF16_UNIT_ROUNDOFF * float(reference.detach().abs().max())


@lru_cache(maxsize=None)
def bnb_fused_bf16_kernel() -> bool:
    """Does bitsandbytes have its fused bf16 4-bit kernel on this CPU (AVX512-BF16)?

    bitsandbytes runs a 4-bit layer's forward on the CPU in one of two ways: dequantize the weight and matmul
    in compute_dtype (every CPU while autograd records; always on CPUs without AVX512-BF16), or, on
    AVX512-BF16 CPUs in inference (eval mode, input not requiring grad), a fused kernel that rounds the
    activations to bf16 whatever compute_dtype says (bitsandbytes 0.50 backends/cpu/ops.py, gemv_4bit:
    "cpu fused op only support bf16 for now"). Which layers take which path depends on autograd state and on
    the loader, so two computations of one quantized model agree exactly only where the kernel does not exist.
    """
    import bitsandbytes  # the quant extra: imported only by the tests that quantize

    return bool(bitsandbytes.functional.has_avx512bf16())


def quantized_forward_atol(largest_logit: float, exact: float = 0.0) -> float:
    """Largest |logit difference| allowed between two computations of one quantized model: `exact` where
    bitsandbytes has one CPU path, else two bf16 roundings of the largest logit.

    Measured on an AVX2 host by emulating the fused kernel (each quantized layer's input and output rounded to
    bf16), tiny Llama / GPT-2 / T5 logits moved by 0.15-0.23% of the largest logit; on an AVX512-BF16 host
    transformers' and peftkit's 4-bit loads differed by up to 3e-3 (largest logit ~1.1). 4-bit quantization
    itself moves them by 5-9%, so the bound still catches a forward that skips or misreads the quantized weights.
    """
    return 2 * BF16_UNIT_ROUNDOFF * largest_logit if bnb_fused_bf16_kernel() else exact

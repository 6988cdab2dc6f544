"""Prompt tuning, prefix tuning and adaption prompts against HF PEFT 0.21 (same logits within 1e-5, fp32)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_model
from peftkit import AdaptedModel, AdapterError, ConfigError, attach
from peftkit.adapters import CONFIG_NAME
from peftkit.cli import app
from peftkit.config import AdaptionPromptConfig, PrefixTuningConfig, PromptTuningConfig, load_config
from peftkit.methods.prompt_tuning import nearest_tokens, soft_prompt_neighbours, text_token_ids
from peftkit.train.loss import loss_sum_and_count

import peft  # noqa: E402  (a test dependency: the reference implementation)
VOCAB = 400
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def inputs(kind, padded=False):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # row 0 left-padded by 3, as generation pads
        ids[0, :3], mask[0, :3] = 2, 0
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def logits(model, kind):
    with torch.no_grad():
        return model(**inputs(kind)).logits


def randomize(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_logits(theirs, kind, virtual):
    """PEFT keeps the logits of the virtual positions of a causal prompt; peftkit drops them."""
    out = logits(theirs, kind)
    return out if kind == "t5" else out[:, virtual:]


# -- file interop, both ways -----------------------------------------------------------------------
OURS = {
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=4, init="random"),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=4, init="random"),
    "adaption_prompt": lambda: AdaptionPromptConfig(adapter_len=3, adapter_layers=2),
}
THEIRS = {
    "prompt_tuning": lambda kind: peft.PromptTuningConfig(num_virtual_tokens=4, task_type=TASK[kind]),
    "prefix_tuning": lambda kind: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type=TASK[kind]),
    "adaption_prompt": lambda kind: peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type=TASK[kind]),
}
PAIRS = [("prompt_tuning", k) for k in ("llama", "gpt2", "t5")] + [
    (m, k) for m in ("prefix_tuning", "adaption_prompt") for k in ("llama", "gpt2")
]


@pytest.mark.parametrize(("method", "kind"), PAIRS)
def test_peft_loads_peftkit_adapter(method, kind, tmp_path):
    ours = attach(build_model(kind, VOCAB), OURS[method]())
    randomize(ours)
    expected = logits(ours, kind)
    ours.save_adapter(tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    known = {f.name for f in dataclasses.fields(type(THEIRS[method](kind)))}
    assert set(raw) <= known, f"keys PEFT does not know: {set(raw) - known}"
    theirs = peft.PeftModel.from_pretrained(build_model(kind, VOCAB), str(tmp_path / "a"))
    virtual = 4 if method == "prompt_tuning" else 0
    torch.testing.assert_close(peft_logits(theirs, kind, virtual), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "kind"), PAIRS)
def test_peftkit_loads_peft_adapter(method, kind, tmp_path):
    theirs = peft.get_peft_model(build_model(kind, VOCAB), THEIRS[method](kind))
    randomize(theirs)  # also opens PEFT's zero gate
    virtual = 4 if method == "prompt_tuning" else 0
    expected = peft_logits(theirs, kind, virtual)
    theirs.save_pretrained(str(tmp_path / "p"))  # a seq2seq prompt is saved as 2N rows (num_transformer_submodules 2)
    ours = AdaptedModel(build_model(kind, VOCAB))
    ours.load_adapter(tmp_path / "p")
    torch.testing.assert_close(logits(ours, kind), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_loss_matches_peft(method, kind, tmp_path):
    """loss.py's selective-logits path (the body, virtual positions dropped) against PEFT's own labels loss."""
    ours = attach(build_model(kind, VOCAB), OURS[method]())
    randomize(ours)
    ours.save_adapter(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build_model(kind, VOCAB), str(tmp_path / "a"))
    batch = inputs(kind)
    labels = batch["input_ids"].clone()
    labels[:, :4] = -100  # loss on the "response" only
    loss_sum, count = loss_sum_and_count(ours, {**batch, "labels": labels})
    with torch.no_grad():
        reference = theirs(**batch, labels=labels).loss
    torch.testing.assert_close(loss_sum.detach() / count, reference, rtol=1e-5, atol=1e-5)


GENERATE = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 2, "output_scores": True, "return_dict_in_generate": True}


def scores(out) -> torch.Tensor:
    return torch.stack(out.scores)  # (steps, B, V)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "adaption_prompt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generation_matches_peft_and_left_padding_changes_nothing(method, kind, tmp_path):
    ours = attach(build_model(kind, VOCAB), OURS[method]())
    randomize(ours)
    ours.save_adapter(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build_model(kind, VOCAB), str(tmp_path / "a"))
    batch, padded = inputs(kind), inputs(kind, padded=True)
    with torch.no_grad():
        expected, got = theirs.generate(**batch, **GENERATE), ours.generate(**batch, **GENERATE)
        in_batch = ours.generate(**padded, **GENERATE)
        alone = ours.generate(input_ids=padded["input_ids"][:1, 3:], attention_mask=padded["attention_mask"][:1, 3:], **GENERATE)
        with ours.disable_adapter():
            base = ours.generate(**batch, **GENERATE)
        plain = build_model(kind, VOCAB).generate(**batch, **GENERATE)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(scores(got), scores(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequences[:, :9], batch["input_ids"]), "the output starts with the prompt's ids"
    # a left-padded row generates what it generates alone (PEFT 0.21's prompt tuning drops position_ids and
    # so shifts padded rows; peftkit keeps generate()'s mask-derived positions)
    torch.testing.assert_close(scores(in_batch)[:, 0], scores(alone)[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores(base), scores(plain), rtol=1e-5, atol=1e-5)  # disabled: the base model
    assert not torch.allclose(scores(got), scores(base))


def test_seq2seq_prompt_generation_matches_peft(tmp_path):
    ours = attach(build_model("t5", VOCAB), OURS["prompt_tuning"]())
    randomize(ours)
    ours.save_adapter(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build_model("t5", VOCAB), str(tmp_path / "a"))
    batch = {k: v for k, v in inputs("t5", padded=True).items() if k != "decoder_input_ids"}
    settings = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        expected = theirs.generate(**batch, **settings)
        got = ours.generate(**batch, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-5, atol=1e-5)


# -- initialisation from a text --------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [PromptTuningConfig, PrefixTuningConfig])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_text_init_reads_as_the_text(config_cls, kind, model_dirs):
    """A fresh text-initialised soft prompt (or prefix) makes the model behave as if the text came first."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dirs[kind]).eval()
    config = config_cls(num_virtual_tokens=7, init="text", init_text="Summarize the outcome")
    text_ids = text_token_ids(base, config.init_text, None, 7)  # 4 tokens repeated to 7
    assert len(set(text_ids.tolist())) < 7
    ids = inputs(kind)["input_ids"] % len(base.get_input_embeddings().weight)
    with torch.no_grad():
        expected = base(input_ids=torch.cat([text_ids.expand(2, -1), ids], 1)).logits[:, 7:]
    adapted = attach(base, config)
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_text_init_without_a_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer"):
        attach(build_model("llama", VOCAB), PromptTuningConfig(init="text"))  # built from a config: no folder


def test_nearest_tokens_of_a_text_prompt_are_its_tokens(model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    adapted = attach(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), PromptTuningConfig(num_virtual_tokens=5))
    ids = tokenizer("Summarize the outcome of this paper", add_special_tokens=False)["input_ids"][:5]
    neighbours = soft_prompt_neighbours(adapted, tokenizer, k=3)
    assert [row[0][0] for row in neighbours] == [tokenizer.decode([i]) for i in ids]
    assert all(row[0][1] == pytest.approx(1.0, abs=1e-5) and row[1][1] < row[0][1] for row in neighbours)
    g = torch.Generator().manual_seed(0)
    prompt, vocabulary = torch.randn(3, 8, generator=g), torch.randn(50, 8, generator=g)
    scores, top = nearest_tokens(prompt, vocabulary, k=2)
    brute = torch.nn.functional.cosine_similarity(prompt[:, None], vocabulary[None], dim=-1)
    assert torch.equal(top[:, 0], brute.argmax(-1)) and torch.allclose(scores[:, 0], brute.max(-1).values)


def test_inspect_lists_nearest_tokens(model_dirs, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    adapted = attach(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), PromptTuningConfig(num_virtual_tokens=3))
    adapted.save_adapter(tmp_path / "a")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "a"), "--nearest", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "PROMPT_TUNING" in result.output and "nearest vocabulary tokens" in result.output
    first = tokenizer.decode(tokenizer("Summarize", add_special_tokens=False)["input_ids"][:1])
    assert repr(first) in result.output  # the init text's first token is virtual token 0's nearest


# -- refusals --------------------------------------------------------------------------------------
def test_adaption_prompt_gate_makes_a_fresh_adapter_exact_and_only_prompt_layers_change():
    adapted = attach(build_model("llama", VOCAB), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    assert adapted.adapter_targets["default"] == ["model.layers.1.self_attn"]
    with pytest.raises(ConfigError, match="adapter_layers is 5"):
        attach(build_model("llama", VOCAB), AdaptionPromptConfig(adapter_layers=5))


def test_input_side_adapters_refuse_what_they_cannot_honour():
    prompt = attach(build_model("llama", VOCAB), PromptTuningConfig(num_virtual_tokens=2, init="random"))
    ids = inputs("llama")["input_ids"]
    with pytest.raises(AdapterError, match="position_ids"):
        prompt(input_ids=ids, position_ids=torch.arange(9).expand(2, -1))
    prefix = attach(build_model("llama", VOCAB), PrefixTuningConfig(num_virtual_tokens=2, init="random"))
    with pytest.raises(AdapterError, match="past_key_values"):
        prefix(input_ids=ids, past_key_values=prefix(input_ids=ids).past_key_values)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(None, ["method=prefix_tuning", "train.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="packing"):
        load_config(None, ["method=prompt_tuning", "data.packing=true"])

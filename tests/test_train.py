"""The trainer: exact gradient accumulation, validation / best / early stopping, ROUGE-L selection,
logs, a tuned model that stops, gradient checkpointing, continuing an adapter, added tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import bf16_atol, build_model, tiny_run_config
from peftkit import AdaptedModel, LoraConfig, attach
from peftkit.config import config_from_dict
from peftkit.data.batching import IGNORE_INDEX
from peftkit.train import tokens as tokens_module
from peftkit.train import run_training
from peftkit.train.objectives import ObjectiveForward
from peftkit.train.step import accumulate_gradients
from peftkit.train.tokens import TokenBatches


def run(model_dirs, data_file, out, data=None, **train):
    raw = tiny_run_config(model_dirs["llama"], data_file, out, **train)
    raw["data"].update(data or {})
    raw["generate"]["num_samples"] = 0
    return run_training(config_from_dict(raw))


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lora_weights(adapter_dir):
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


# -- gradient accumulation ------------------------------------------------------------------------
def unequal_examples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, n_target in ((30, 3), (6, 5), (18, 12), (9, 2), (25, 20), (4, 3), (14, 1), (11, 9)):
        ids = torch.randint(3, 390, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n - n_target) + ids[n - n_target :]})
    return out


def grads_after(micro_batch_size, examples, dtype=torch.float32):
    model = attach(build_model("llama", 400).to(dtype), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", init="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    result = accumulate_gradients(ObjectiveForward(TokenBatches(pad_id=2), model), examples, micro_batch_size)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_four_micro_batches_of_two_equal_one_batch_of_eight(dtype):
    examples = unequal_examples()
    whole, whole_result = grads_after(None, examples, dtype)
    accumulated, acc_result = grads_after(2, examples, dtype)
    assert acc_result.target_tokens == whole_result.target_tokens == 55
    assert abs(acc_result.loss - whole_result.loss) < 1e-5
    # bf16: micro-batches of 2 are padded to other lengths than the batch of 8, so the bf16 base rounds other
    # shapes; each gradient tensor within 8 roundings of its largest element (measured: 1.9; the naive average
    # below is 78-319 roundings off, in fp32 and in bf16)
    def atol(grad):
        return 1e-7 if dtype == torch.float32 else bf16_atol(grad, 8)

    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5 if dtype == torch.float32 else 0, atol=atol(whole[name]))
    # the control: averaging each micro-batch's own mean loss weights tokens unequally
    naive = {n: torch.zeros_like(g) for n, g in whole.items()}
    for i in range(0, 8, 2):
        part, _ = grads_after(None, examples[i : i + 2], dtype)
        for n in naive:
            naive[n] += part[n] / 4
    assert any(float((naive[n] - whole[n]).abs().max()) > max(1e-4, 4 * atol(whole[n])) for n in whole)


# -- validation, best checkpoint, early stopping, logs ---------------------------------------------
def test_validation_each_epoch_keeps_the_best_and_loads_it(model_dirs, data_file, tmp_path):
    out = tmp_path / "run"
    result = run(model_dirs, data_file, out, epochs=3, eval_every=2, load_best=True, lr=3e-2)
    vals = [r for r in records(out) if "val_loss" in r]
    steps_per_epoch = 5  # 18 training rows, batch 4
    assert [r["step"] for r in vals] == [2, 4, 5, 6, 8, 10, 12, 14, 15]
    assert all(abs(r["val_ppl"] - torch.tensor(r["val_loss"]).exp().item()) < 1e-3 * r["val_ppl"] for r in vals)
    best = min(vals, key=lambda r: r["val_loss"])
    assert json.loads((out / "best/best.json").read_text())["step"] == best["step"] == result.best_step
    assert result.best_score == pytest.approx(best["val_loss"])
    best_weights = load_file(str(out / "best/trainable.safetensors"))
    final = lora_weights(result.adapter_dir)
    assert len(final) == len(best_weights)
    for name, tensor in best_weights.items():
        saved = "base_model.model." + name.replace("model.", "", 1).replace(".default", "")
        assert torch.equal(final[saved], tensor), name
    assert steps_per_epoch * 3 == result.steps


def test_early_stopping_after_patience(model_dirs, data_file, tmp_path, monkeypatch):
    scores = iter([3.0, 2.0, 2.5, 2.4, 2.3, 1.0])
    monkeypatch.setattr(tokens_module, "evaluate_loss", lambda *a, **k: next(scores))
    result = run(model_dirs, data_file, tmp_path / "run", epochs=3, eval_every=1, early_stopping_patience=3)
    assert result.stopped_early and result.steps == 5 and result.best_step == 2 and result.best_score == 2.0


def test_select_by_rouge_l_matches_rouge_score(model_dirs, data_file, tmp_path):
    from rouge_score import rouge_scorer

    from peftkit.eval.metrics import first_line
    from peftkit.generate import generate_texts
    from peftkit.artifacts import load_artifact

    out = tmp_path / "run"
    result = run(model_dirs, data_file, out, epochs=1, select_by="rougeL", lr=3e-2)
    last = [r for r in records(out) if "val_rougeL" in r][-1]
    assert last["step"] == result.steps
    loaded = load_artifact(result.adapter_dir, device="cpu")
    task_rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    from peftkit.data.datasets import split_by_ratio

    train, _ = split_by_ratio(task_rows, 0.125, 0)
    _, validation = split_by_ratio(train, 0.125 / 0.875, 1)
    answers = generate_texts(loaded.model, loaded.tokenizer, loaded.format, validation, max_new_tokens=8)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r["summary"], first_line(a))["rougeL"].fmeasure for r, a in zip(validation, answers)) / len(validation)
    assert last["val_rougeL"] == pytest.approx(expected, abs=1e-9)


def test_logs_jsonl_csv_and_loss_curve(model_dirs, data_file, tmp_path):
    import csv

    out = tmp_path / "run"
    result = run(model_dirs, data_file, out, epochs=1)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == len(records(out)) and {"step", "loss", "lr", "tokens_per_s", "val_loss"} <= set(rows[0])
    assert result.loss_curve == out / "loss_curve.png" and result.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "tensorboard").exists(), "tensorboard is not installed here, so it is skipped silently"


# -- the tuned model stops ------------------------------------------------------------------------
def test_a_tuned_model_learns_eos_and_stops(model_dirs, tmp_path):
    from peftkit.artifacts import load_artifact

    rows = [{"abstract": f"This paper studies problem {i}.", "summary": "Results show gains."} for i in range(8)]
    data = tmp_path / "fixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Full fine-tuning: in this random tiny model the tied embeddings (std 0.02) cap the logits near
    # +-1.3, so only a method that can grow them can make one answer certain. The EOS path is the same.
    raw = tiny_run_config(model_dirs["llama"], data, tmp_path / "run", max_steps=40, lr=3e-3, schedule="constant")
    raw.update(method="full", generate={"num_samples": 0})
    raw["data"].update(val_ratio=0.0, test_ratio=0.0)
    result = run_training(config_from_dict(raw))
    loaded = load_artifact(result.adapter_dir, device="cpu")
    max_new = 20
    prompt = loaded.format.render(rows[0])
    assert "problem 0" in prompt
    from peftkit.generate import encode_prompts, left_pad

    ids, mask = left_pad(encode_prompts(loaded.tokenizer, loaded.format, rows[:1]), loaded.tokenizer.pad_token_id)
    out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) < max_new and new[-1] == loaded.tokenizer.eos_token_id, "generation stopped at EOS"
    assert loaded.generate(rows[:1], max_new_tokens=max_new) == ["Results show gains."]


# -- memory options -------------------------------------------------------------------------------
def test_gradient_checkpointing_with_frozen_embeddings_gives_lora_gradients():
    from peftkit.train.setup import enable_gradient_checkpointing

    examples = unequal_examples()[:4]
    grads = []
    for checkpointing in (False, True):
        model = build_model("llama", 400)
        adapted = attach(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init="gaussian"))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        assert not model.get_input_embeddings().weight.requires_grad
        if checkpointing:
            enable_gradient_checkpointing(model)
        adapted.train()
        accumulate_gradients(ObjectiveForward(TokenBatches(pad_id=2), adapted), examples, None)
        grads.append({n: p.grad for n, p in adapted.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for n, p in adapted.named_parameters() if not p.requires_grad)


# -- continuing an adapter, added tokens ------------------------------------------------------------
def test_continue_training_from_our_adapter_and_from_peft(model_dirs, data_file, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peftkit.models import load_model
    from peftkit.train.setup import prepare_model

    # lr 1e-2: the first batch's loss drops 5.98 -> 5.71 in fp32 and in bf16; at 3e-2 the loss bounced back up
    # (5.69 -> 6.24) and the second run started lower only by 0.3% in fp32, higher in bf16
    first = run(model_dirs, data_file, tmp_path / "a", epochs=1, lr=1e-2)
    second = run(model_dirs, data_file, tmp_path / "b", epochs=1, lr=1e-2, init_adapter=str(first.adapter_dir))
    assert second.first_loss < first.first_loss, "the second run starts where the first ended"
    cfg = config_from_dict(tiny_run_config(model_dirs["llama"], data_file, tmp_path / "b2", init_adapter=str(first.adapter_dir)))
    ours = prepare_model(cfg, load_model(cfg.model)[0]).adapter_state_dict()
    saved = lora_weights(first.adapter_dir)
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in saved)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
        PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    raw = tiny_run_config(model_dirs["llama"], data_file, tmp_path / "c", epochs=1, init_adapter=str(tmp_path / "peft"))
    cfg = config_from_dict(raw)
    adapted = prepare_model(cfg, load_model(cfg.model)[0])
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    ours = adapted.adapter_state_dict()
    assert len(ours) == len(theirs) == 8
    for key, value in theirs.items():
        assert torch.equal(ours[key.replace(".default", "")], value), key
    assert all(p.requires_grad for n, p in adapted.named_parameters() if "lora_" in n)


def test_added_special_tokens_are_saved_and_load_on_a_fresh_base(model_dirs, tmp_path):
    rows = [{"abstract": f"Paper {i} <ans>", "summary": f"<ans> gains {i}"} for i in range(12)]
    data = tmp_path / "tok.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(model_dirs, data, tmp_path / "run", {"add_special_tokens": ["<ans>"]}, epochs=1, lr=3e-2)
    tensors = lora_weights(result.adapter_dir)
    assert tensors["base_model.model.model.embed_tokens.weight"].shape[0] == 401
    reloaded, tokenizer = AdaptedModel.from_pretrained(result.adapter_dir)
    token = tokenizer.convert_tokens_to_ids("<ans>")
    assert token == 400 and tokenizer("x <ans>", add_special_tokens=False)["input_ids"][-1] == 400
    probe = torch.tensor([[5, 6, 400, 7]])
    again, _ = AdaptedModel.from_pretrained(result.adapter_dir)
    torch.testing.assert_close(reloaded(input_ids=probe).logits, again(input_ids=probe).logits, rtol=0, atol=0)
    trained_row = tensors["base_model.model.model.embed_tokens.weight"][400]
    embedding = reloaded.get_input_embeddings()  # the modules_to_save wrapper; the adapter's copy is active
    assert torch.equal(embedding.modules_to_save["default"].weight[400], trained_row)
    assert not torch.equal(embedding.original_module.weight[400], trained_row), "the trained row came from the adapter"


def test_packed_and_padding_free_runs_train_with_less_padding(model_dirs, data_file, tmp_path):
    plain = run(model_dirs, data_file, tmp_path / "plain", epochs=1, padding_free=False)
    packed = run(model_dirs, data_file, tmp_path / "packed", {"packing": True}, epochs=1, batch_size=1, padding_free=False)
    flat = run(model_dirs, data_file, tmp_path / "flat", epochs=1)  # padding_free is the default
    assert packed.padding_fraction < plain.padding_fraction and packed.padding_fraction < 0.2
    assert flat.padding_fraction == 0.0 < plain.padding_fraction
    assert packed.train_tokens == plain.train_tokens == flat.train_tokens, "the same tokens, in fewer padded positions"
    assert packed.last_loss < packed.first_loss
    assert abs(flat.first_loss - plain.first_loss) < 1e-4, "same batches, same first loss: only the padding went"

"""Preference tuning (#19): DPO / IPO / ORPO losses and gradients equal TRL's (fp32, 1e-5)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import build_model, tiny_run_config

from peftkit.train.preference_loss import PairScores, PreferenceSettings, pair_losses

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

TOL = 1e-5


def toy_pairs(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, completion_mask) of 3 pairs, rows [chosen..., rejected...] as TRL batches them; same prompt per pair."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (4, 6, 5)]
    answers = [[torch.randint(3, vocab, (n,), generator=g) for n in lengths] for lengths in ((3, 5), (4, 2), (6, 6))]
    for side in (0, 1):
        for prompt, pair in zip(prompts, answers):
            rows.append(torch.cat([prompt, pair[side]]))
            masks.append(torch.cat([torch.zeros(len(prompt)), torch.ones(len(pair[side]))]).long())
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=2) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(m, (0, width - len(m))) for m in masks])
    return ids, mask


def per_token_logps(model: torch.nn.Module, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """(rows, T-1) log-probability of each next token, zero outside the answers (TRL's `log_probs`)."""
    logits = model(input_ids=ids, attention_mask=(ids != 2).long()).logits[:, :-1].float()
    taken = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return taken * completion[:, 1:]


def trl_dpo_loss(beta: float, loss_type: str, logps: torch.Tensor, ref_logps: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on precomputed per-token log-probs (the model returns them as its fused head would)."""
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool))
    n = logps.shape[0] // 2
    ref = ref_logps.sum(1)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion), "completion_mask": completion,
              "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


def scores_of(logps: torch.Tensor, completion: torch.Tensor, ref_logps: torch.Tensor | None = None) -> PairScores:
    n = logps.shape[0] // 2
    sums, tokens = logps.sum(1), completion[:, 1:].sum(1)
    ref = ref_logps.sum(1) if ref_logps is not None else None
    return PairScores(sums[:n], sums[n:], tokens[:n], tokens[n:], None if ref is None else ref[:n], None if ref is None else ref[n:])


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def assert_close_grads(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert any(float(g.abs().max()) > 1e-6 for g in ours)  # the check is not vacuous


@pytest.fixture()
def tiny():
    torch.set_default_dtype(torch.float32)
    policy = build_model("llama", 64, seed=0).float()
    reference = build_model("llama", 64, seed=1).float()
    return policy, reference


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_loss_and_gradients_equal_trl(tiny, loss_type, beta):
    policy, reference = tiny
    ids, completion = toy_pairs(64)
    with torch.no_grad():
        ref_logps = per_token_logps(reference, ids, completion)
    logps = per_token_logps(policy, ids, completion)
    theirs = trl_dpo_loss(beta, loss_type, logps, ref_logps, completion)
    losses, chosen_reward, rejected_reward = pair_losses(PreferenceSettings("dpo", beta=beta, loss=loss_type),
                                                         scores_of(logps, completion, ref_logps))
    ours = losses.mean()
    assert abs(ours.item() - theirs.item()) < TOL and ours.item() > 0
    assert_close_grads(grads(policy, ours), grads(policy, theirs))
    if loss_type == "sigmoid":  # TRL's implicit rewards: beta * log-ratio
        sums, ref = logps.sum(1).detach(), ref_logps.sum(1)
        torch.testing.assert_close(chosen_reward, beta * (sums[:3] - ref[:3]))
        torch.testing.assert_close(rejected_reward, beta * (sums[3:] - ref[3:]))


def trl_orpo_loss(orpo_lambda: float, logps: torch.Tensor, completion: torch.Tensor, pair: int) -> torch.Tensor:
    """TRL's ORPO loss of one pair: its chosen NLL (cross-entropy over the chosen answer's tokens) minus lambda times
    the mean of `odds_ratio_loss` on the per-token averaged log-probs."""
    n = logps.shape[0] // 2
    tokens = completion[:, 1:].sum(1)
    mean = logps.sum(1) / tokens
    trainer = SimpleNamespace(beta=orpo_lambda, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, mean[pair : pair + 1], mean[n + pair : n + pair + 1])
    nll = -logps[pair].sum() / tokens[pair]  # nn.CrossEntropyLoss over the chosen labels (mean over tokens)
    return nll - ratio_losses.mean()


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_loss_and_gradients_equal_trl(tiny, orpo_lambda):
    policy, _ = tiny
    ids, completion = toy_pairs(64, seed=3)
    logps = per_token_logps(policy, ids, completion)
    losses, *_ = pair_losses(PreferenceSettings("orpo", orpo_lambda=orpo_lambda), scores_of(logps, completion))
    for pair in range(3):  # TRL's NLL is a token mean over its batch: per pair, the two agree exactly
        theirs = trl_orpo_loss(orpo_lambda, logps, completion, pair)
        assert abs(losses[pair].item() - theirs.item()) < TOL
        assert_close_grads(grads(policy, losses[pair]), grads(policy, theirs))


def test_orpo_odds_ratio_term_equals_trl_on_extreme_log_probs():
    chosen = torch.tensor([-1e-4, -0.3, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    rejected = torch.tensor([-2.0, -1e-3, -0.7, -0.69, -0.01, -1.0], dtype=torch.float64)
    ones = torch.ones(6)
    losses, *_ = pair_losses(PreferenceSettings("orpo", orpo_lambda=0.5), PairScores(chosen, rejected, ones, ones))
    trainer = SimpleNamespace(beta=0.5, accelerator=SimpleNamespace(device="cpu"))
    ratio, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    torch.testing.assert_close(losses, (-chosen - ratio).float(), atol=TOL, rtol=TOL)
    assert torch.isfinite(losses).all()


def test_sft_weight_adds_the_chosen_answers_per_token_nll():
    chosen, rejected = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -9.0])
    tokens = torch.tensor([3, 4])
    scores = PairScores(chosen, rejected, tokens, tokens, torch.tensor([-5.0, -2.5]), torch.tensor([-3.0, -8.0]))
    plain, *_ = pair_losses(PreferenceSettings("dpo", beta=0.1), scores)
    weighted, *_ = pair_losses(PreferenceSettings("dpo", beta=0.1, sft_weight=0.5), scores)
    torch.testing.assert_close(weighted - plain, 0.5 * torch.tensor([2.0, 0.5]))


# -- the objective: peftkit's own scoring path (token loss, padding-free row) against TRL -----------------------------
def pair_units(ids: torch.Tensor, completion: torch.Tensor) -> list[dict]:
    """toy_pairs as the objective's training units (unpadded examples, labels on the answers)."""
    n = ids.shape[0] // 2

    def example(row: int) -> dict:
        length = int(completion[row].nonzero().max()) + 1
        tokens = ids[row, :length].tolist()
        labels = [t if int(completion[row, i]) else -100 for i, t in enumerate(tokens)]
        return {"input_ids": tokens, "labels": labels}

    return [{"chosen": example(i), "rejected": example(n + i), "key": ("train", i)} for i in range(n)]


@pytest.mark.parametrize("flat", [False, True])
def test_objective_scores_and_dpo_gradients_equal_trl(tiny, flat):
    from peftkit.train.attention import enable_padding_free
    from peftkit.train.preference import pair_batch, sequence_logps

    policy, reference = tiny
    ids, completion = toy_pairs(64, seed=5)
    units = pair_units(ids, completion)
    if flat:
        assert enable_padding_free(policy) and enable_padding_free(reference)
    tokens = torch.tensor([sum(l != -100 for l in u[s]["labels"][1:]) for s in ("chosen", "rejected") for u in units])
    batch = pair_batch(units, pad_id=2, flat=flat)
    ours_logps = sequence_logps(policy, batch, tokens)
    with torch.no_grad():
        ref_sums = sequence_logps(reference, batch, tokens)
        ref_logps = per_token_logps(reference, ids, completion)
    torch.testing.assert_close(ref_sums, ref_logps.sum(1), atol=TOL, rtol=TOL)
    scores = PairScores(ours_logps[:3], ours_logps[3:], tokens[:3], tokens[3:], ref_sums[:3], ref_sums[3:])
    ours = pair_losses(PreferenceSettings("dpo", beta=0.2), scores)[0].mean()
    theirs = trl_dpo_loss(0.2, "sigmoid", per_token_logps(policy, ids, completion), ref_logps, completion)
    assert abs(ours.item() - theirs.item()) < TOL
    assert_close_grads(grads(policy, ours), grads(policy, theirs))


# -- end to end: the one loop, the CLI, the data rules ----------------------------------------------------------------
def write_pairs(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def toy_pair_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"Is item {i} good?", "chosen": f"Yes, item {i} is good.", "rejected": f"No idea about {i} at all."}
            for i in range(n)]


def pair_config(model_dir, data_file, out, objective: str, **extra) -> dict:
    cfg = tiny_run_config(model_dir, data_file, out, epochs=6, batch_size=4, lr=2e-2, precision="fp32", log_every=1)
    cfg["data"].update({"template": None, "prompt": "prompt", "response": "chosen", "val_ratio": 0.25, "test_ratio": 0.0})
    cfg["objective"] = objective
    cfg["preference"] = {"beta": 0.5}
    cfg["generate"]["num_samples"] = 0
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def metrics_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_cli_preference_training_raises_preference_accuracy(tmp_path, model_dirs, objective):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, toy_pair_rows())
    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(pair_config(model_dirs["llama"], data, out, objective)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(tmp_path / "cfg.yaml")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r for r in metrics_of(out) if "loss" in r and "val_loss" not in r]
    val = [r for r in metrics_of(out) if "val_loss" in r]
    assert steps[0]["pairs"] == 4 and "reward_margin" in steps[0] and "reward_accuracy" in steps[0]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert val[-1]["val_reward_accuracy"] > val[0]["val_reward_accuracy"] or val[-1]["val_loss"] < val[0]["val_loss"]
    assert (out / "adapter" / "peftkit.json").is_file()
    if objective == "dpo":  # `peftkit eval --pairs`: the tuned adapter prefers the chosen answers more than the base
        done = subprocess.run([sys.executable, "-m", "peftkit.cli", "eval", "-a", f"dpo={out / 'adapter'}", "--pairs", str(data),
                               "--out", str(tmp_path / "eval")], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        preference = json.loads((tmp_path / "eval" / "results.json").read_text())["preference"]
        assert preference["n"] == 16 and preference["reference"] == "base"
        assert preference["scores"]["dpo"]["accuracy"] > 0.5 and preference["scores"]["dpo"]["margin"] > 0
        assert "accuracy" not in preference["scores"]["base"]


@pytest.mark.parametrize("method", ["dora", "qlora", "full"])
def test_dpo_with_dora_qlora_and_full_fine_tuning(tmp_path, model_dirs, method):
    from peftkit.config import load_config
    from peftkit.train.loop import run_training

    data = tmp_path / "pairs.jsonl"
    write_pairs(data, toy_pair_rows(8))
    raw = pair_config(model_dirs["llama"], data, tmp_path / "run", "dpo", method=method)
    raw["train"].update({"epochs": 1, "lr": 1e-3})
    if method == "dora":
        raw["lora"]["use_dora"] = True
        raw["method"] = "lora"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    result = run_training(load_config(tmp_path / "cfg.yaml"))
    first = metrics_of(tmp_path / "run")[0]
    # step 1 starts at the reference: log-ratios 0, so the loss is log 2 and the margin 0
    assert abs(first["loss"] - math.log(2)) < 1e-4 and abs(first["reward_margin"]) < 1e-4
    assert result.steps == 2 and math.isfinite(result.last_loss)


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(tmp_path, model_dirs):
    from peftkit.config import load_config
    from peftkit.train.loop import run_training

    data = tmp_path / "pairs.jsonl"
    write_pairs(data, toy_pair_rows(8))
    sft = pair_config(model_dirs["llama"], data, tmp_path / "sft", "sft")
    sft["train"]["epochs"] = 1
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    adapter = run_training(load_config(tmp_path / "sft.yaml")).adapter_dir
    dpo = pair_config(model_dirs["llama"], data, tmp_path / "dpo", "dpo")
    dpo["train"].update({"epochs": 1, "init_adapter": str(adapter)})
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    run_training(load_config(tmp_path / "dpo.yaml"))
    first = metrics_of(tmp_path / "dpo")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-4 and abs(first["reward_margin"]) < 1e-4  # reference = the SFT adapter


def test_identical_and_empty_pairs_are_counted_not_trained(tmp_path, tokenizer, caplog):
    from types import SimpleNamespace as NS

    from peftkit.data.preference import load_pairs, tokenize_pairs

    rows = toy_pair_rows(4) + [{"prompt": "p", "chosen": "same", "rejected": "same"},
                               {"prompt": "q", "chosen": "x " * 200, "rejected": "short"}]
    write_pairs(tmp_path / "p.jsonl", rows)
    data = NS(train=str(tmp_path / "p.jsonl"), validation=None, test=None, columns={}, val_ratio=0.0, test_ratio=0.0,
              template=None, prompt="prompt", chat_template=False, system_prompt=None, dataset=None)
    task = load_pairs(data, NS(chosen="chosen", rejected="rejected"), 0)
    pairs, stats = tokenize_pairs(task.train, tokenizer, task, max_length=64)
    assert (stats.pairs, stats.identical, stats.empty) == (4, 1, 1) and len(pairs) == 4
    assert "identical" in caplog.text and "no token" in caplog.text
    for pair in pairs:  # loss masks on the answers only, the prompt shared
        for side in ("chosen", "rejected"):
            labels = pair[side]["labels"]
            assert labels[0] == -100 and labels[-1] == tokenizer.eos_token_id
        k = pair["chosen"]["labels"].index(next(l for l in pair["chosen"]["labels"] if l != -100))
        assert pair["chosen"]["input_ids"][:k] == pair["rejected"]["input_ids"][:k]


def test_chat_pairs_mask_the_shared_prompt_turns(tmp_path, tokenizer):
    from types import SimpleNamespace as NS

    from peftkit.data.preference import load_pairs, tokenize_pairs

    user = {"role": "user", "content": "Which is better?"}
    rows = [{"chosen": [user, {"role": "assistant", "content": f"The first one {i}."}],
             "rejected": [user, {"role": "assistant", "content": f"Neither {i}."}]} for i in range(3)]
    write_pairs(tmp_path / "chat.jsonl", rows)
    data = NS(train=str(tmp_path / "chat.jsonl"), validation=None, test=None, columns={}, val_ratio=0.0, test_ratio=0.0,
              template=None, prompt="prompt", chat_template=True, system_prompt=None, dataset=None)
    task = load_pairs(data, NS(chosen="chosen", rejected="rejected"), 0)
    assert task.shape == "chat"
    pairs, stats = tokenize_pairs(task.train, tokenizer, task, max_length=128)
    assert stats.pairs == 3
    labelled = tokenizer.decode([t for t in pairs[0]["chosen"]["labels"] if t != -100])
    assert "The first one 0." in labelled and "Which is better" not in labelled


def test_builtin_outcome_preference_pairs_abstracts_with_the_same_papers_summaries():
    from types import SimpleNamespace as NS

    from peftkit.data.preference import load_pairs
    from peftkit.data.sources import aclsum_rows

    data = NS(train=None, dataset="aclsum/outcome-preference", template=None, chat_template=True, system_prompt=None)
    task = load_pairs(data, NS(chosen="chosen", rejected="rejected"), 0)
    for split, rows in (("train", task.train), ("validation", task.validation), ("test", task.test)):
        outcome, challenge, approach = (aclsum_rows(split, a) for a in ("outcome", "challenge", "approach"))
        assert len(rows) == len(outcome) > 0
        for i, row in enumerate(rows):
            assert row["abstract"] == outcome[i]["abstract"] and row["chosen"] == outcome[i]["summary"]
            assert row["rejected"] == (challenge, approach)[i % 2][i]["summary"] and row["id"] == challenge[i]["id"]
    assert task.format.render(task.test[0]).count(task.test[0]["abstract"]) == 1


def test_estimate_counts_both_answers_of_every_pair(tmp_path, model_dirs):
    from peftkit.config import load_config
    from peftkit.estimate import estimate_memory, run_batches

    data = tmp_path / "pairs.jsonl"
    write_pairs(data, [{**r, "chosen": r["rejected"] + " " + r["chosen"]} for r in toy_pair_rows(16)])  # chosen the longer
    estimates, shapes = {}, {}
    for objective in ("sft", "dpo"):
        raw = pair_config(model_dirs["llama"], data, tmp_path / objective, objective, method="full")
        raw["train"].update({"padding_free": False, "max_steps": 2})
        (tmp_path / f"{objective}.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_config(tmp_path / f"{objective}.yaml")
        shapes[objective], estimates[objective] = run_batches(cfg), estimate_memory(cfg)
    assert [s.rows for s in shapes["dpo"]] == [2 * s.rows for s in shapes["sft"]] == [8, 8]
    assert 1.4 < estimates["dpo"].activations / estimates["sft"].activations < 2.2
    # the reference is cached log-probs, not a frozen copy: weights, gradients, optimizer as for SFT
    assert (estimates["dpo"].weights, estimates["dpo"].optimizer) == (estimates["sft"].weights, estimates["sft"].optimizer)


@pytest.mark.parametrize("max_steps,epochs,expected", [(1, 1, None), (3, 1, 10), (None, 2, 10)])
def test_the_starting_reference_scores_only_the_pairs_the_run_visits(tmp_path, model_dirs, max_steps, epochs, expected):
    from peftkit.config import load_config
    from peftkit.train.preference import PreferenceObjective

    data = tmp_path / "pairs.jsonl"
    write_pairs(data, toy_pair_rows(4))
    raw = pair_config(model_dirs["llama"], data, tmp_path / "run", "dpo")
    raw["train"].update({"max_steps": max_steps, "epochs": epochs})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    objective = PreferenceObjective(load_config(tmp_path / "cfg.yaml"))
    objective.units = [{"chosen": {"input_ids": [1] * (i % 5 + 1)}, "rejected": {"input_ids": [1]}, "key": ("train", i)}
                       for i in range(10)]
    visited = objective.visited_pairs()
    first_step = {objective.units[i]["key"] for i in objective.epoch_batches(0)[0]}  # 4 or 2 pairs (10 = 4 + 4 + 2)
    assert {p["key"] for p in visited} == (first_step if expected is None else {u["key"] for u in objective.units})
    assert len(visited) == len({p["key"] for p in visited})

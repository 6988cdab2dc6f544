"""Mixed-adapter batches: one forward pass, each row through its own adapter, outputs as if served alone."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model
from peftkit import AdaptedModel, LoraConfig
from peftkit.data.datasets import prompt_ids
from peftkit.data.templates import PromptFormat, format_prompt
from peftkit.errors import PeftkitError
from peftkit.generate import generate_ids
from peftkit.serve import Engine, SamplingParams, ServeSettings
from peftkit.serve.batching import Scheduler
from peftkit.serve.decode import Sequence, safe_end
from peftkit.serve.routing import RoutedLoraLinear, enable_row_routing, routable
from serving_helpers import PROMPTS, TEMPLATE, save_adapter, save_all, single_thread  # noqa: F401 (autouse fixture)

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
ROWS = ["outcome", "challenge", None, "approach", "outcome", None, "approach", "challenge"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    return save_all(tmp_path_factory.mktemp("adapters"), len(tokenizer))


@pytest.fixture()
def engine(folders, tokenizer):
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "base", ServeSettings(max_batch_size=8))
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


def run(engine: Engine, rows, prompts, params=GREEDY) -> list[list[int]]:
    seqs = [engine.sequence(a or "base", engine.encode_completion(a, p), params) for a, p in zip(rows, prompts)]
    engine.run_batch(seqs)
    return [s.tokens for s in seqs]


def plain_model(folders, tokenizer) -> AdaptedModel:
    """The tiny base with every adapter loaded the ordinary way (no row routing)."""
    adapted = AdaptedModel(build_model("llama", len(tokenizer)))
    for name, folder in folders.items():
        adapted.load_adapter(folder, name=name)
    return adapted


def reference(adapted: AdaptedModel, tokenizer, adapter, ids) -> list[int]:
    """The same request through transformers' generate with only that adapter active."""
    adapted.set_adapter(adapter)
    return generate_ids(adapted, tokenizer, [ids], max_new_tokens=GREEDY.max_tokens)[0]


def test_mixed_batch_equals_each_request_alone(engine, folders, tokenizer):
    calls = []
    hook = engine.adapted.model.model.embed_tokens.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    mixed = run(engine, ROWS, PROMPTS)
    hook.remove()
    assert calls[0][0] == len(ROWS), "the prefill must run all rows in one forward pass"
    assert len(calls) <= GREEDY.max_tokens, "one forward per step for the whole batch"
    assert len({tuple(t) for t in mixed}) > 4, "adapters must change the outputs"
    plain = plain_model(folders, tokenizer)
    for adapter, prompt, tokens in zip(ROWS, PROMPTS, mixed):
        assert tokens == run(engine, [adapter], [prompt])[0]
        assert tokens == reference(plain, tokenizer, adapter, engine.encode_completion(adapter, prompt))


@pytest.mark.parametrize("kind, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_proj"])])
def test_routed_logits_match_the_plain_lora_path(kind, targets, tmp_path, tokenizer):
    adapted = AdaptedModel(build_model(kind, len(tokenizer)))
    for i, rank in enumerate((2, 4, 8)):
        folder = save_adapter(tmp_path / f"a{i}", len(tokenizer), rank, targets[: 1 + i % 2], seed=i, kind=kind)
        adapted.load_adapter(folder, name=f"a{i}")
    adapted.set_adapter(None)
    routing = enable_row_routing(adapted)
    assert any(isinstance(m, RoutedLoraLinear) for m in adapted.modules())
    ids = torch.randint(3, len(tokenizer), (5, 9), generator=torch.Generator().manual_seed(0))
    rows = ["a0", None, "a1", "a2", "a0"]
    with torch.no_grad():
        with routing.route(rows):
            mixed = adapted(input_ids=ids).logits
        for i, name in enumerate(rows):
            adapted.set_adapter(name)
            torch.testing.assert_close(mixed[i : i + 1], adapted(input_ids=ids[i : i + 1]).logits, rtol=1e-5, atol=1e-5)
    adapted.set_adapter(None)
    with torch.no_grad():
        assert not torch.allclose(mixed[0], adapted(input_ids=ids[:1]).logits[0], atol=1e-3)


@pytest.mark.parametrize("options", [{"modules_to_save": ["lm_head"]}, {"use_dora": True}], ids=["modules_to_save", "dora"])
def test_adapters_that_cannot_be_row_routed_get_their_own_batches(engine, tmp_path, tokenizer, options):
    folder = save_adapter(tmp_path / "head", len(tokenizer), 4, ["q_proj"], seed=9, **options)
    engine.load_adapter("head", folder)
    assert not routable(engine.adapted, "head") and routable(engine.adapted, "outcome")
    for model in ("outcome", "head", "base"):
        seq = engine.sequence(model, [5, 6, 7], GREEDY)
        engine.queue.put(seq, engine.batch_group(seq))
    group, first = engine.queue.admit(None, 0, lambda extra: True, timeout=1)
    assert [s.adapter for s in first] == ["outcome", None]
    late = engine.sequence("base", [5, 6], GREEDY)
    engine.queue.put(late, engine.batch_group(late))
    assert engine.queue.admit(group, 2, lambda extra: True, timeout=1)[1] == [], "no one overtakes the older `head` request"
    _, second = engine.queue.admit(None, 0, lambda extra: True, timeout=1)
    assert [s.adapter for s in second] == ["head"]
    engine.run_batch(second)
    adapted = AdaptedModel(build_model("llama", len(tokenizer)))
    adapted.load_adapter(folder, name="head")
    assert second[0].tokens == generate_ids(adapted, tokenizer, [[5, 6, 7]], max_new_tokens=GREEDY.max_tokens)[0]


def test_merge_serves_the_adapter_alone_with_plain_layers(engine, tokenizer, folders):
    unmerged = run(engine, ["outcome"] * 3, PROMPTS[:3])
    solo = Engine(build_model("llama", len(tokenizer)), tokenizer, "base")
    solo.load_adapter("outcome", folders["outcome"])
    solo.merge_only("outcome")
    assert solo.model_names() == ["outcome"]
    assert not any(isinstance(m, RoutedLoraLinear) for m in solo.model.modules())
    assert run(solo, ["outcome"] * 3, PROMPTS[:3]) == unmerged
    with pytest.raises(PeftkitError, match="merged"):
        solo.load_adapter("challenge", folders["challenge"])
    with pytest.raises(PeftkitError, match="not served"):
        solo.resolve("base")


def test_completion_prompt_fills_the_adapters_single_field(engine, tokenizer):
    fmt = PromptFormat([TEMPLATE], chat=True)
    expected = prompt_ids(tokenizer, fmt, format_prompt(tokenizer, fmt, {"abstract": "We study X."}))
    assert engine.encode_completion("outcome", "We study X.") == expected
    assert engine.encode_completion(None, "We study X.") == tokenizer("We study X.")["input_ids"]
    chat = engine.encode_chat("outcome", [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(chat).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_multi_field_template_is_refused(engine, tmp_path, tokenizer):
    folder = save_adapter(tmp_path / "two", len(tokenizer), 2, ["q_proj"], seed=4, template="{title}\n{abstract}")
    engine.load_adapter("two", folder)
    with pytest.raises(PeftkitError, match="one field"):
        engine.encode_completion("two", "text")


def test_unloaded_adapter_fails_queued_requests_and_frees_layers(engine):
    seq = engine.sequence("approach", [5, 6], GREEDY)
    events = []
    seq.on_event = events.append
    engine.unload_adapter("approach")
    engine.run_batch([seq])
    assert events[-1].error[0] == 404
    assert all("approach" not in m.lora_A for m in engine.adapted.modules() if isinstance(m, RoutedLoraLinear))


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(engine):
    seq = engine.sequence("base", engine.encode_completion(None, PROMPTS[0]), GREEDY)
    engine.run_batch([seq])
    full = seq.text
    assert len(full) > 3
    stop = full[2:4]
    pieces = []
    params = SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,))
    seq = engine.sequence("base", engine.encode_completion(None, PROMPTS[0]), params)
    seq.on_event = lambda e: pieces.append(e.text)
    engine.run_batch([seq])
    assert seq.finish_reason == "stop" and seq.text == full[: full.find(stop)] and "".join(pieces) == seq.text
    assert safe_end("abc\ufffd", ()) == 3 and safe_end("hello wo", ("world",)) == 6


def test_seeded_sampling_is_reproducible_and_limits_are_checked(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, b = run(engine, ["outcome", "outcome"], ["We", "We"], params)
    assert a == b and len(a) > 0
    with pytest.raises(PeftkitError, match="limit"):
        engine.sequence("base", [5] * 3000, GREEDY)
    with pytest.raises(PeftkitError, match="token id 400 in the prompt is outside the vocabulary"):
        engine.sequence("base", [5, 400], GREEDY)
    with pytest.raises(PeftkitError, match="context"):
        engine.sequence("base", [5] * 10, SamplingParams(max_tokens=600))


def test_scheduler_admits_in_order_up_to_the_batch_size_and_budget():
    static = Scheduler(max_batch_size=4, max_wait_ms=1, continuous=False)
    seqs = [Sequence(prompt_ids=[1], adapter=None, params=GREEDY) for _ in range(6)]
    for s in seqs[:5]:
        static.put(s, "mixed")
    static.put(seqs[5], "other")
    always = lambda extra: True  # noqa: E731
    assert static.admit(None, 0, always, timeout=1) == ("mixed", seqs[:4])
    assert static.admit("mixed", 4, always, timeout=1) == ("mixed", []), "static: nobody joins a running batch"
    assert static.admit(None, 0, always, timeout=1) == ("mixed", [seqs[4]])
    assert static.admit(None, 0, always, timeout=1) == ("other", [seqs[5]])
    assert static.admit(None, 0, always, timeout=0.01) == (None, [])
    continuous = Scheduler(max_batch_size=4, max_wait_ms=1, continuous=True)
    for s in seqs[:5]:
        continuous.put(s, "mixed")
    assert continuous.admit("mixed", 2, always, timeout=0) == ("mixed", seqs[:2]), "joins fill the free rows"
    assert continuous.admit("mixed", 3, lambda extra: len(extra) < 1, timeout=0) == ("mixed", []), "over budget: wait"
    seqs[2].cancelled.set()
    assert continuous.admit("mixed", 3, always, timeout=0) == ("mixed", [seqs[3]]), "a cancelled request never runs"
    events = []
    late = Sequence(prompt_ids=[1], adapter=None, params=GREEDY, on_event=events.append)
    continuous.close()
    continuous.put(late, "mixed")
    assert events[0].error[0] == 503 and continuous.admit(None, 0, always, timeout=0.01) == (None, [])


def test_a_stopped_engine_answers_503_instead_of_hanging(engine):
    events = []
    seq = engine.sequence("base", [5, 6], GREEDY)
    seq.on_event = events.append
    engine.submit(seq)
    assert events[0].error == (503, "the decode thread is not running (Engine.start(), or the app's lifespan, starts it)")


def test_combined_adapter_is_served(engine):
    engine.combine("same", ["outcome", "challenge"], [1.0, 0.0], "cat")  # exactly `outcome`, at rank 12
    assert "same" in engine.model_names() and engine.adapters["same"].routable
    both = run(engine, ["same", "challenge", "outcome"], PROMPTS[:3])
    assert both[0] == run(engine, ["outcome"], PROMPTS[:1])[0]


def test_adapter_from_another_base_is_refused(engine, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama", len(tokenizer))
    config.hidden_size, config.intermediate_size = 32, 64
    adapted = AdaptedModel(AutoModelForCausalLM.from_config(config))
    adapted.add_adapter("default", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapted.save_adapter(tmp_path / "other")
    with pytest.raises(PeftkitError, match="shape"):
        engine.load_adapter("other", tmp_path / "other")
    assert "other" not in engine.model_names()
    assert all("other" not in m.lora_A for m in engine.adapted.modules() if isinstance(m, RoutedLoraLinear))


def test_a_reused_name_serves_the_new_weights(engine, folders):
    mix = ["outcome", "challenge", None]
    before = run(engine, mix, PROMPTS[:3])
    engine.unload_adapter("outcome")
    engine.load_adapter("outcome", folders["approach"])  # same name, other weights
    after = run(engine, mix, PROMPTS[:3])
    assert after[0] == run(engine, ["approach"], PROMPTS[:1])[0] != before[0]
    assert after[1:] == before[1:]


# -- continuous batching -------------------------------------------------------------------------------
def alone(engine: Engine, model: str, prompt: list[int], params=GREEDY) -> list[int]:
    seq = engine.sequence(model, prompt, params)
    engine.run_batch([seq])
    return seq.tokens


def test_sequences_join_and_leave_between_steps_with_the_same_answers(engine):
    jobs = [("outcome", [5, 6, 7, 8, 9, 10, 11]), ("base", [9, 4]), ("challenge", [7] * 12), ("approach", [3, 30, 31])]
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [alone(engine, m, p, long) for m, p in jobs]
    seqs = [engine.sequence(m, p, long) for m, p in jobs]
    engine.queue.put(seqs[0], engine.batch_group(seqs[0]))
    engine.queue.put(seqs[1], engine.batch_group(seqs[1]))
    engine.iterate()
    engine.iterate()
    assert len(engine.batch) == 2
    for seq in seqs[2:]:  # arrive while the first two are decoding: they join, with longer and shorter prompts
        engine.queue.put(seq, engine.batch_group(seq))
    engine.iterate()
    assert len(engine.batch) == 4 and engine.stats["mixed_steps"] > 0
    while engine.batch.seqs:
        engine.iterate()
    assert [s.tokens for s in seqs] == expected
    assert engine.batch.cache is None and engine.queue.admit(None, 0, lambda extra: True, timeout=0) == (None, [])


def test_a_cancelled_sequence_leaves_within_one_step(engine):
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    seqs = [engine.sequence("outcome", [5, 6, 7], long), engine.sequence("base", [8, 9], long)]
    for seq in seqs:
        engine.queue.put(seq, engine.batch_group(seq))
    engine.iterate()
    engine.iterate()
    seqs[0].cancelled.set()
    made = len(seqs[0].tokens)
    engine.iterate()
    assert engine.batch.seqs == [seqs[1]] and len(seqs[0].tokens) <= made + 1
    seqs[1].cancelled.set()
    engine.iterate()
    assert not engine.batch.seqs


def test_a_request_that_does_not_fit_the_kv_budget_waits(folders, tokenizer):
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "base", ServeSettings(kv_cache_tokens=40))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    first, second = engine.sequence("base", [5] * 8, params), engine.sequence("base", [6] * 12, params)
    for seq in (first, second):
        engine.queue.put(seq, engine.batch_group(seq))
    engine.iterate()
    assert engine.batch.seqs == [first], "two rows of (12 + 10) slots exceed 40: the second waits"
    while not first.done:
        assert engine.batch.footprint() <= 40
        engine.iterate()
    engine.iterate()
    assert engine.batch.seqs == [second]
    with pytest.raises(PeftkitError, match="KV-cache budget of 40"):
        engine.sequence("base", [5] * 35, params)

"""lm-evaluation-harness end to end against a real `peftkit serve` (uvicorn on 127.0.0.1): local-completions
with its default settings (token-id requests, tokenizer found through /tokenizer_info and /tokenize) for a
multiple-choice and a generation task from aclsum, local-chat-completions for generation; the base and an
adapter both scored, and the multiple-choice accuracy equal to `peftkit eval --mc`'s on the same questions.

Slow (over 30 s): run with `pytest -m slow tests/test_serve_lm_eval.py` (docs/serving.md)."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from conftest import build_model
from peftkit import AdaptedModel
from peftkit.data.sources import aclsum_rows
from peftkit.eval.multiple_choice import mc_accuracy, read_mc_file
from peftkit.serve import Engine, ServeSettings, create_app
from peftkit.serve.lm_eval_tasks import write_tasks
from serving_helpers import save_adapter, single_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.slow  # ~1 min quiet (lm-eval's imports and three harness runs); `pytest -m slow tests/test_serve_lm_eval.py`

@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lm-eval")
    adapter = save_adapter(root / "outcome", len(tokenizer), 4, ["q_proj", "v_proj"], seed=11)
    tasks = write_tasks(tokenizer, aclsum_rows("test", "outcome")[:6], root / "tasks", abstract_chars=120, summary_chars=40)
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny", ServeSettings(max_prompt_tokens=400))
    engine.load_adapter("outcome", adapter)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", tasks, adapter
    server.should_exit = True
    thread.join(timeout=15)


def evaluate(model_type: str, model_args: str, tasks: list[str], folder, **options) -> dict:
    return simple_evaluate(model=model_type, model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                           log_samples=False, **options)["results"]


def test_lm_eval_scores_the_base_and_an_adapter_like_peftkit_eval(served, tokenizer):
    url, tasks, adapter = served
    questions = read_mc_file(tasks["mc"])
    plain = AdaptedModel(build_model("llama", len(tokenizer)))
    plain.load_adapter(adapter, name="outcome")
    for model in ("tiny", "outcome"):
        results = evaluate("local-completions", f"model={model},base_url={url}/v1/completions,num_concurrent=1,max_retries=1",
                           ["aclsum_outcome_mc", "aclsum_outcome_gen"], tasks["folder"])
        plain.set_adapter(None if model == "tiny" else "outcome")
        expected = mc_accuracy(plain, tokenizer, questions)["accuracy"]["value"]
        assert results["aclsum_outcome_mc"]["acc,none"] == pytest.approx(expected), model
        assert results["aclsum_outcome_gen"]["bleu,none"] >= 0.0
    chat = evaluate("local-chat-completions", f"model=outcome,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
                    ["aclsum_outcome_gen"], tasks["folder"], apply_chat_template=True)
    assert chat["aclsum_outcome_gen"]["bleu,none"] >= 0.0

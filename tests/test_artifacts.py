"""One loader for every kind of folder: an adapter trained with added tokens goes through generate, eval,
combine, merge and inspect; full fine-tune and merged folders load and describe themselves."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_config

from peftkit.artifacts import artifact_kind, describe_artifact, load_artifact
from peftkit.combine import combine_folders
from peftkit.config import config_from_dict
from peftkit.errors import AdapterError
from peftkit.eval.systems import SystemPool, describe_systems
from peftkit.inference import merge_to_folder
from peftkit.train import run_training

TOKEN = "<ans>"
ROWS = [{"abstract": f"We study {TOKEN} problem 3."}]


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory):
    """An adapter trained with an added special token (embeddings resized, saved with the adapter)."""
    out = tmp_path_factory.mktemp("added")
    data = out / "train.jsonl"
    data.write_text("".join(f'{{"abstract": "Problem {i} {TOKEN}.", "summary": "Gains {i}."}}\n' for i in range(16)))
    raw = tiny_run_config(model_dirs["llama"], data, out / "run", epochs=1, lr=3e-2, precision="fp32")
    raw["data"]["add_special_tokens"] = [TOKEN]
    raw["generate"]["num_samples"] = 0
    return run_training(config_from_dict(raw)).adapter_dir


def test_generate_uses_the_resized_embeddings(trained):
    artifact = load_artifact(trained, device="cpu")
    assert artifact.kind == "adapter" and TOKEN in artifact.tokenizer.get_vocab()
    assert artifact.model.get_input_embeddings().weight.shape[0] == len(artifact.tokenizer) == 401
    assert len(artifact.generate(ROWS, max_new_tokens=3)) == 1


def test_eval_pool_resizes_the_shared_base(trained):
    systems = describe_systems([trained], include_base=True)
    pool = SystemPool(systems, device="cpu")
    expected = load_artifact(trained, device="cpu")
    ids = expected.tokenizer(f"x {TOKEN}", return_tensors="pt")
    with torch.no_grad(), pool.use(systems[1]) as loaded:
        got = loaded.model(**ids).logits
    torch.testing.assert_close(got, expected.model(**ids).logits, rtol=0, atol=0)


def test_combine_merge_and_inspect(trained, tmp_path):
    with pytest.raises(AdapterError):  # trained embedding rows (modules_to_save) are not a LoRA update to combine
        combine_folders([trained, trained], [0.5, 0.5], tmp_path / "both", how="cat")
    merged, error = merge_to_folder(trained, tmp_path / "merged")
    assert error < 1e-4 and artifact_kind(merged) == "merged"
    assert load_artifact(merged, device="cpu").model.get_input_embeddings().weight.shape[0] == 401
    info = describe_artifact(trained)
    assert info["kind"] == "adapter" and info["added tokens"] is True
    assert describe_artifact(merged)["kind"] == "merged model"


def test_full_fine_tune_folder_is_described(model_dirs, tmp_path, data_file):
    raw = tiny_run_config(model_dirs["llama"], data_file, tmp_path / "full", max_steps=1, precision="fp32")
    raw["method"], raw["generate"]["num_samples"] = "full", 0
    folder = run_training(config_from_dict(raw)).adapter_dir
    info = describe_artifact(folder)
    assert info["kind"] == "full fine-tune" and info["method"] == "full" and info["model type"] == "llama"
    assert load_artifact(folder, device="cpu").kind == "full"


def test_a_folder_that_is_neither_says_so(tmp_path):
    with pytest.raises(AdapterError, match="neither an adapter folder"):
        artifact_kind(tmp_path)


def test_serve_loads_the_adapter_onto_a_resized_base(trained, model_dirs):
    from peftkit.serve.engine import Engine

    engine = Engine.from_paths(str(model_dirs["llama"]), {"added": trained}, device="cpu")
    assert TOKEN in engine.tokenizer.get_vocab()
    assert engine.adapted.model.get_input_embeddings().weight.shape[0] == len(engine.tokenizer) == 401

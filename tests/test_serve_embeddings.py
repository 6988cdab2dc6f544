"""/v1/embeddings for a served embedding adapter (a tiny BERT encoder): the vectors training and `peftkit eval`
compute, per model (base or adapter), floats or base64; a generation server points to the right server."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import BertConfig, BertModel

from conftest import build_model
from peftkit import AdaptedModel, LoraConfig
from peftkit.serve import Engine, ServeSettings, create_app
from peftkit.serve.embeddings import EmbeddingService, create_embedding_app
from peftkit.tasks.embedding import encode_texts
from serving_helpers import single_thread  # noqa: F401 (autouse fixture)

TEXTS = ["We study low-resource translation.", "Results improve by nine points."]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tokenizer):
    """A tiny BERT folder and a LoRA embedding adapter on it (random B), recorded as `task: embedding`."""
    root = tmp_path_factory.mktemp("encoder")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapted = AdaptedModel(BertModel.from_pretrained(root / "base"))
    adapted.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    meta = {"task": "embedding", "run_config": {"embedding": {"pooling": "mean"}, "data": {"max_length": 64}},
            "base_model": {"name_or_path": str(root / "base")}}
    return root / "base", adapted.save_adapter(root / "emb", metadata=meta)


def test_embeddings_equal_what_training_computes(encoder, tokenizer):
    base, folder = encoder
    service = EmbeddingService.from_paths({"emb": folder}, model=str(base), device="cpu")
    with TestClient(create_embedding_app(service)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "emb"]
        r = client.post("/v1/embeddings", json={"model": "emb", "input": TEXTS})
        body = r.json()
        assert r.status_code == 200 and [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] > 0
        plain = AdaptedModel(BertModel.from_pretrained(base))
        plain.load_adapter(folder, name="emb")
        expected = encode_texts(plain, tokenizer, TEXTS, pooling="mean", max_length=64)
        got = torch.tensor([d["embedding"] for d in body["data"]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        base_vectors = torch.tensor([d["embedding"] for d in client.post(
            "/v1/embeddings", json={"model": "base", "input": TEXTS}).json()["data"]])
        assert not torch.allclose(base_vectors, got, atol=1e-3), "the adapter changes the vectors"
        packed = client.post("/v1/embeddings", json={"model": "emb", "input": TEXTS[0], "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, got[0].numpy(), atol=1e-6)
        ids = tokenizer(TEXTS[0])["input_ids"]
        by_ids = client.post("/v1/embeddings", json={"model": "emb", "input": ids}).json()["data"][0]["embedding"]
        assert np.allclose(by_ids, got[0].numpy(), atol=1e-5)
        for bad, param in (({"input": "x", "dimensions": 8}, "dimensions"), ({"input": []}, "input"), ({"input": [10**6]}, "input")):
            r = client.post("/v1/embeddings", json={"model": "emb", **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert client.post("/v1/embeddings", json={"model": "ghost", "input": "x"}).status_code == 404


def test_a_generation_server_says_where_embeddings_come_from(tokenizer):
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny", ServeSettings())
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/embeddings", json={"model": "tiny", "input": "x"})
        assert r.status_code == 400 and "embedding adapter" in r.json()["error"]["message"]

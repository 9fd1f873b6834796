"""The server talks to engines through `EngineClient` alone (yun/engine/client.py).

Each implementation declares every member of the protocol with a matching signature, and
the server runs against a minimal fake client (scripted tokens, no model): health,
metrics, completions and chat, streamed and not.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any, AsyncIterator

import pytest
from fastapi.testclient import TestClient

from yun.config import EngineConfig, ModelConfig
from yun.engine.async_engine import AsyncEngine
from yun.engine.client import EngineClient, EngineStats, ReplicaState
from yun.distributed.ray_replicas import RayReplicas
from yun.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from yun.sampling_params import GuidedDecoding, SamplingParams
from yun.server import ServerSettings, build_app
from yun.tokenizer import Tokenizer

SCRIPT = " the quick brown fox jumps over the lazy dog"


def _members(proto: type) -> tuple[dict[str, Any], set[str]]:
    """The protocol's methods (name -> function) and data members."""
    methods = {n: f for n, f in vars(proto).items()
               if inspect.isfunction(f) and not n.startswith("_")}
    data = set(proto.__annotations__)
    return methods, data


def _declared(cls: type) -> set[str]:
    names = set(dir(cls))
    for base in cls.__mro__:
        names |= set(getattr(base, "__annotations__", {}))
    return names


def _params(f: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(f)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("impl", [AsyncEngine, RayReplicas])
def test_each_implementation_declares_the_protocol_with_matching_signatures(impl):
    methods, data = _members(EngineClient)
    assert {"generate", "abort", "embed", "compile_grammar", "replica_states", "start",
            "shutdown"} <= set(methods)
    missing = (set(methods) | data) - _declared(impl)
    assert not missing, f"{impl.__name__} lacks {sorted(missing)}"
    for name, proto_fn in methods.items():
        fn = getattr(impl, name)
        assert callable(fn), name
        assert _params(fn) == _params(proto_fn), f"{impl.__name__}.{name}"
        assert (inspect.iscoroutinefunction(fn) == inspect.iscoroutinefunction(proto_fn)), name
        if name == "generate":
            assert inspect.isasyncgenfunction(fn)
    for name in data:  # a data member is a property, or declared on the class
        attr = inspect.getattr_static(impl, name, None)
        assert attr is None or isinstance(attr, property), f"{impl.__name__}.{name}"


class FakeClient:
    """An EngineClient that 'generates' a fixed text token by token (no model)."""

    def __init__(self, path: str, replicas: list[ReplicaState] | None = None):
        self.config = EngineConfig(model="fake", max_num_seqs=4)
        self.model_config = ModelConfig.load(path)
        self.tokenizer = Tokenizer.load(path)
        self.max_model_len = 256
        self.task = "generate"
        self.pooling = None
        self.stats = EngineStats(num_running=0, num_blocks=8, num_free_blocks=8)
        self.is_alive = False
        self.num_unfinished = 0
        self.script = self.tokenizer.encode(SCRIPT, add_special_tokens=False)
        self.seen: list[SamplingParams] = []
        self.aborted: list[str] = []
        self._replicas = replicas or []

    def replica_states(self) -> list[ReplicaState]:
        return self._replicas

    def start(self) -> None:
        self.is_alive = True

    def shutdown(self, timeout: float = 10.0) -> None:
        self.is_alive = False

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None,
                       grammar: Any = None) -> AsyncIterator[RequestOutput]:
        self.seen.append(params)
        rid = request_id or "fake"
        tokens = self.script[:params.max_tokens or len(self.script)]
        sent_text = ""
        self.num_unfinished += 1
        try:
            for k in range(1, len(tokens) + 1):
                await asyncio.sleep(0)
                done = k == len(tokens)
                text = self.tokenizer.decode(tokens[:k], True)
                if params.output_kind is RequestOutputKind.FINAL_ONLY and not done:
                    continue
                delta = params.output_kind is RequestOutputKind.DELTA
                out = CompletionOutput(
                    0, text[len(sent_text):] if delta else text,
                    tokens[k - 1:k] if delta else tokens[:k],
                    finish_reason=("length" if k == params.max_tokens else "stop")
                    if done else None)
                sent_text = text
                yield RequestOutput(rid, prompt, list(prompt_token_ids), [out], finished=done,
                                    kind=params.output_kind)
        finally:
            self.num_unfinished -= 1

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        raise ValueError("this model serves text generation")

    def compile_grammar(self, spec: GuidedDecoding) -> Any:
        return None


@pytest.fixture(scope="module")
def fake(qwen2_path) -> FakeClient:
    return FakeClient(qwen2_path)


def _sse(body: str) -> list[dict[str, Any]]:
    lines = [ln[6:] for ln in body.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_the_fake_satisfies_the_protocol_at_runtime(fake):
    assert isinstance(fake, EngineClient)
    assert not isinstance(object(), EngineClient)


def test_the_server_runs_against_a_fake_client(fake):
    expected = fake.tokenizer.decode(fake.script, True)
    with TestClient(build_app(fake, ServerSettings(served_model_name="fake"))) as http:
        assert fake.is_alive  # the app's lifespan started it
        health = http.get("/health").json()
        assert health == {"status": "ok"}  # no replicas: no "replicas" key
        metrics = http.get("/metrics").text
        assert "yun_kv_cache_usage_ratio" in metrics and "yun_replica_" not in metrics
        card = http.get("/v1/models").json()["data"][0]
        assert card["id"] == "fake" and card["max_model_len"] == 256

        body = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50}).json()
        assert body["choices"][0]["text"] == expected
        assert body["usage"]["completion_tokens"] == len(fake.script)

        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50,
                                               "stream": True})
        chunks = _sse(r.text)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected

        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
            "stream": True})
        chunks = _sse(r.text)
        content = "".join(c["choices"][0]["delta"].get("content") or ""
                          for c in chunks if c["choices"])
        assert content == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        body = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()
        assert body["choices"][0]["message"]["content"] == fake.tokenizer.decode(
            fake.script[:3], True)
        assert body["choices"][0]["finish_reason"] == "length"

        # The server asks for deltas and adds them up itself (usage, whole responses).
        assert fake.seen and all(p.output_kind is RequestOutputKind.DELTA for p in fake.seen)
        r = http.post("/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 400  # task "generate": the server says so, no probing
    assert not fake.num_unfinished


def test_replica_states_show_in_health_and_metrics(qwen2_path):
    states = [{"replica": 0, "healthy": True, "pid": 1, "restarts": 0, "routed": 3,
               "in_flight": 0, "num_running": 0, "num_waiting": 0, "kv_usage": 0.0,
               "prefix_cache_hit_rate": 0.5}]
    fake = FakeClient(qwen2_path, replicas=states)
    with TestClient(build_app(fake, ServerSettings(served_model_name="fake"))) as http:
        assert http.get("/health").json() == {"status": "ok", "replicas": states}
        metrics = http.get("/metrics").text
        assert 'yun_replica_routed_total{replica="0"} 3.0' in metrics
        assert 'yun_replica_prefix_cache_hit_rate{replica="0"} 0.5' in metrics

"""POST /v1/embeddings: text (or token ids) in, one vector per input out.

The engine computes the vectors (`EngineClient.embed`: one prefill-only forward, pooled
as the checkpoint's sentence-transformers config says, normalised); here the request is
checked and tokenised, `dimensions` truncates each vector (Matryoshka-style, normalised
again when the model normalises) and `encoding_format` picks a list of floats or base64
(little-endian float32, what the OpenAI SDK decodes).
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any, Literal

from pydantic import ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from yun.engine.errors import EngineDeadError
from yun.server.errors import APIError, bad_request
from yun.server.protocol import Int64, TokenId, _Request
from yun.server.serving import OpenAIServing

MAX_INPUTS = 2048  # inputs per request (OpenAI's limit)

EmbeddingInput = str | list[str] | list[TokenId] | list[list[TokenId]]


class EmbeddingRequest(_Request):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Int64 | None = None
    user: str | None = None

    @field_validator("input", mode="wrap")
    @classmethod
    def _input_shape(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             f"(0 to {2**31 - 1}) or a list of token-id lists") from None


def _items(inp: EmbeddingInput) -> list[str | list[int]]:
    if isinstance(inp, str):
        return [inp]
    if inp and all(isinstance(t, int) for t in inp):
        return [list(inp)]  # type: ignore[arg-type]
    return list(inp)  # type: ignore[arg-type]


def _shaped(vec: list[float], dimensions: int | None, normalize: bool) -> list[float]:
    if dimensions is not None:
        vec = vec[:dimensions]
        if normalize:
            norm = math.sqrt(sum(x * x for x in vec)) or 1.0
            vec = [x / norm for x in vec]
    return vec


def _encoded(vec: list[float], fmt: str | None) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec


class Embeddings:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.engine = serving.engine
        self.tokenizer = serving.tokenizer

    def _tokenize(self, items: list[str | list[int]]) -> list[list[int]]:
        return [self.tokenizer.encode(x, True) if isinstance(x, str) else x for x in items]

    def _check(self, req: EmbeddingRequest, prompts: list[list[int]]) -> None:
        limit, vocab = self.engine.max_model_len, self.serving.vocab_size
        for i, ids in enumerate(prompts):
            if not ids:
                raise bad_request(f"input[{i}] is empty: at least one token is needed", "input")
            if len(ids) > limit:
                raise bad_request(f"input[{i}] has {len(ids)} tokens, more than this model "
                                  f"takes ({limit})", "input")
            if any(t >= vocab for t in ids):
                raise bad_request(f"input[{i}] has a token id out of range: the vocabulary "
                                  f"has {vocab} tokens", "input")
        size = self.engine.model_config.hidden_size
        if req.dimensions is not None and not 1 <= req.dimensions <= size:
            raise bad_request(f"dimensions must be in [1, {size}] for this model, got "
                              f"{req.dimensions}", "dimensions")

    async def __call__(self, req: EmbeddingRequest) -> dict[str, Any]:
        s = self.serving
        s.check_model(req.model, task="embed")
        items = _items(req.input)
        if not items:
            raise bad_request("input must not be empty", "input")
        if len(items) > MAX_INPUTS:
            raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(items)}",
                              "input")
        prompts = await run_in_threadpool(self._tokenize, items)
        self._check(req, prompts)
        slot = s.take(1)  # no tenant metering for embeddings yet: see the README
        try:
            vectors = await self.engine.embed(prompts)
        except ValueError as e:
            raise bad_request(str(e), "input") from e
        except EngineDeadError as e:
            raise APIError(503, str(e)) from e
        finally:
            slot.release()
        pooling = self.engine.pooling
        normalize = pooling is not None and pooling.normalize
        data = [{"object": "embedding", "index": i,
                 "embedding": _encoded(_shaped(v, req.dimensions, normalize),
                                       req.encoding_format)}
                for i, v in enumerate(vectors)]
        n = sum(len(p) for p in prompts)
        return {"object": "list", "data": data, "model": s.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

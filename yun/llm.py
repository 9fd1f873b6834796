"""The offline Python API: `LLM(model).generate(prompts, params)` over the same engine."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Sequence

from tqdm.auto import tqdm

from yun.config import EngineConfig
from yun.demo import DEMO_NOTICE
from yun.engine.engine import LLMEngine
from yun.model_source import DEMO_RANDOM
from yun.outputs import RequestOutput, RequestOutputKind
from yun.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    """Load a model once, then generate for batches of prompts.

    `model` is a GGUF file, an HF folder or hub id; None uses the default model
    (SmolLM2-135M-Instruct), "demo-random" a random-weight Qwen2.5-0.5B-shaped checkpoint.
    Any `EngineConfig` field can be passed as a keyword argument.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 kv_cache_memory: int | None = None, max_num_seqs: int = 64,
                 device: str = "auto", seed: int = 0, **kwargs: Any):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, dtype=dtype, max_model_len=max_model_len,
                                   block_size=block_size, kv_cache_memory=kv_cache_memory,
                                   max_num_seqs=max_num_seqs, device=device, seed=seed, **kwargs)
        if model == DEMO_RANDOM:
            print(f"yun: {DEMO_NOTICE}", flush=True)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's worker processes and leave its process group
        (tensor_parallel_size > 1); nothing to do otherwise. Idempotent. They also stop
        when the LLM is garbage-collected, at the end of a `with LLM(...) as llm:` block,
        and when this process exits."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order, each holding everything generated (the
        engine sends each request's final output only, whatever `output_kind` says).
        Prompts are strings or {"prompt_token_ids": [...]} dicts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for "
                                 f"{len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                text, token_ids = self._tokenize(prompt)
                rid = self.engine.new_request_id()
                final = self.engine.inputs.for_engine(params,
                                                      output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(rid, token_ids, final, prompt=text)
                ids.append(rid)
            return self._run(ids, use_tqdm if use_tqdm is not None else len(ids) > 8)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool | None = None, tools: list[dict[str, Any]] | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Render the model's own chat template for one conversation (or a list of them),
        with `tools` (OpenAI-shaped definitions) as the template lays them out: the same
        path as the server's chat endpoints (yun/engine/inputs.py's `render_chat`)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conv in convs:
            text, ids = self.engine.inputs.render_chat(conv, add_generation_prompt,
                                                       template_kwargs, tools)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.inputs.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self.engine.inputs.encode(prompt["prompt"])
        raise TypeError("a prompt is a string or a dict with 'prompt' or 'prompt_token_ids'")

    def _run(self, ids: list[str], show: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not show)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in ids]

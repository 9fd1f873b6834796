"""LLMEngine: the synchronous core. `step()` = schedule, run, update, detokenize.

One request from the API (`n` completions) becomes `n` engine requests ("children");
the engine aggregates them back into one RequestOutput.
"""

from __future__ import annotations

import itertools
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from yun.config import EngineConfig, ModelConfig
from yun.engine.detokenize import IncrementalDetokenizer
from yun.engine.executor import Runner
from yun.engine.guided import GuidedDecoder
from yun.engine.inputs import InputProcessor, check_prompt, eos_token_ids
from yun.engine.kv_cache import KVCacheManager
from yun.engine.kv_groups import HybridKVCacheManager
from yun.engine.request import Request, RequestStatus
from yun.engine.runner import ModelRunner
from yun.engine.pooling import has_sentence_transformers_config, load_pooling
from yun.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput
from yun.engine.spec.ngram import NgramProposer
from yun.engine.spec.speculator import Speculator
from yun.model_source import resolve_model
from yun.outputs import CompletionOutput, PositionLogprobs, RequestOutput, RequestOutputKind
from yun.sampling_params import GuidedDecoding, SamplingParams
from yun.tokenizer import Tokenizer


_EMBED_PARAMS = SamplingParams(max_tokens=1)


@dataclass
class _Child:
    request: Request
    detok: IncrementalDetokenizer
    finish_reason: str | None = None
    num_detokenized: int = 0  # output tokens already given to the detokenizer
    tokens_sent: int = 0  # DELTA outputs: output tokens already handed out
    text_sent: int = 0  # DELTA outputs: characters of text already handed out


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    sent_any: bool = False  # an output went out (DELTA: prompt logprobs come with the first)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: Runner | None = None):
        """`runner`: run steps on this instead of a ModelRunner built here (no tensor
        parallelism then; the model's config and tokenizer are still read from its files)."""
        self.config = config
        path = resolve_model(config.model)
        self.model_config = ModelConfig.load(path)
        self.tokenizer = Tokenizer.load(path)
        self.tp = None  # tensor parallelism: this process is rank 0 and starts the others
        if runner is None and config.tensor_parallel_size > 1:
            from yun.distributed.parallel import start_tensor_parallel

            self.tp = start_tensor_parallel(config, self.model_config)
        # Workers and process groups go when the engine does (`del`, garbage collection),
        # not only on shutdown(): the finalizer holds the group, not the engine.
        self._release = weakref.finalize(self, self.tp.shutdown) if self.tp else None
        try:
            self.runner: Runner = runner or ModelRunner(
                self.model_config, self.tp.config if self.tp else config, self.tp)
            num_blocks = self.runner.allocate_kv_cache(config.kv_cache_memory)
        except BaseException:
            if self._release is not None:
                self._release.detach()
                self.tp.shutdown(graceful=False)
            raise
        capacity = num_blocks * config.block_size
        self.max_model_len = self._resolve_max_len(config.max_model_len, capacity)
        self.kv = self._make_kv(num_blocks)
        batched = config.max_num_batched_tokens or (
            512 if self.runner.device.type == "cpu" else 8192)
        if not config.enable_chunked_prefill:
            batched = max(batched, self.max_model_len)
        self.max_num_batched_tokens = batched
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, batched, self.max_model_len,
                            config.enable_chunked_prefill), self.kv)
        self.eos_token_ids = eos_token_ids(self.model_config.eos_token_ids,
                                           self.tokenizer.eos_token_id)
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, str] = {}
        self.guided = GuidedDecoder(self.tokenizer.hf, self.model_config.vocab_size,
                                    self.eos_token_ids)
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.task = self._resolve_task(config.task, path)
        self.pooling = load_pooling(path, self.runner.is_encoder) if self.task == "embed" else None
        if self.pooling is not None and self.pooling.max_seq_length:  # as sentence-transformers
            self.max_model_len = min(self.max_model_len, self.pooling.max_seq_length)
        self.speculator = self._make_speculator(config)
        self.inputs = InputProcessor(self.tokenizer, self.eos_token_ids)

    def _resolve_task(self, task: str, path: str) -> str:
        task = self._detect_task(task, path)
        if task == "embed" and self.tp is not None:
            raise ValueError("embeddings are not supported with tensor parallelism yet "
                             "(--tensor-parallel-size 1)")
        return task

    def _detect_task(self, task: str, path: str) -> str:
        if self.runner.is_encoder:
            if task == "generate":
                raise ValueError(f"{path}: {self.model_config.architecture} is an encoder: it "
                                 "serves embeddings only (--task embed)")
            return "embed"
        if task == "auto":
            return "embed" if has_sentence_transformers_config(path) else "generate"
        return task

    def _make_speculator(self, config: EngineConfig) -> Speculator | None:
        method = config.speculative_method
        if method is None:
            return None
        if self.task == "embed":
            raise ValueError("speculative decoding is for text generation, not --task embed")
        capacity = self.kv.num_blocks * self.kv.block_size
        if method == "draft":
            from yun.engine.spec.draft import build_draft_proposer

            proposer = build_draft_proposer(config, self.model_config, self.tokenizer,
                                            capacity, self.max_num_batched_tokens)
        elif method == "mtp":
            from yun.engine.spec.mtp import build_mtp_proposer

            proposer = build_mtp_proposer(config, self.runner, capacity)
        else:
            proposer = NgramProposer()
        return Speculator(proposer, config.num_speculative_tokens)

    def _make_kv(self, num_blocks: int) -> KVCacheManager | HybridKVCacheManager:
        """One block pool, or two KV-cache groups when the runner split the cache for a
        model with sliding and full layers (yun/engine/kv_groups.py)."""
        config = self.config
        window_blocks = getattr(self.runner, "num_window_blocks", 0)  # a test runner: none
        if window_blocks:
            return HybridKVCacheManager(num_blocks, window_blocks, config.block_size,
                                        self.runner.group_window,
                                        config.enable_prefix_caching)
        return KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                              self._shared_window())

    def _shared_window(self) -> int | None:
        """The window past which blocks can be freed: the widest one when every layer
        slides (yun/engine/kv_cache.py), else None (some layer sees everything)."""
        if self.runner.is_encoder:
            return None
        windows = self.model_config.layer_windows()
        if not windows or any(w is None for w in windows):
            return None
        return max(windows)

    def _resolve_max_len(self, wanted: int | None, capacity: int) -> int:
        limit = self.model_config.max_context_len
        if wanted is None:
            return min(limit, capacity)
        if wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's context length "
                             f"({limit} tokens: max_position_embeddings, stretched by its "
                             "rope scaling if any)")
        if wanted > capacity:
            raise ValueError(f"max_model_len={wanted} does not fit the KV cache "
                             f"({capacity} tokens); raise kv_cache_memory")
        return wanted

    # ---- requests ----------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, prompt: str | None = None,
                    grammar: Any = None) -> None:
        """Queue a request. Raises ValueError for input the model cannot take
        (InvalidParam, naming the field, for the prompt and its params). `params` built by
        `self.inputs` (or with its EOS ids) are used as they are, else copied once with
        them; `grammar`: `params.guided` already compiled (`compile_grammar`), else it is
        compiled (or found cached) here, once for all `n` completions."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        check_prompt(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        room = self.max_model_len - len(prompt_token_ids)
        if params._eos_token_ids != self.eos_token_ids:
            params = self.inputs.for_engine(params)
        if params.guided is not None and grammar is None:  # a bad grammar: before any state
            grammar = self.compile_grammar(params.guided)
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params)
        for i in range(params.n):
            seed = ((params.seed + i) % 2**63 if params.seed is not None
                    else self._seed_rng.getrandbits(63))
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(child_id, parent.prompt_token_ids, params,
                          max_tokens=min(params.max_tokens or room, room), seed=seed)
            if params.guided is not None:  # one grammar matcher per completion
                req.grammar = self.guided.new_state(
                    grammar, params.guided.start_after,
                    [*params._eos_token_ids, *params.stop_token_ids])
            parent.children.append(_Child(req, IncrementalDetokenizer(
                self.tokenizer, parent.prompt_token_ids, params)))
            self._child_to_parent[child_id] = request_id
        self._parents[request_id] = parent
        for child in parent.children:
            self.scheduler.add_request(child.request)

    def compile_grammar(self, spec: GuidedDecoding) -> Any:
        """The compiled grammar for `spec` (cached by spec; ValueError naming the
        problem). Thread-safe: the server compiles in a worker thread and hands the result
        to `add_request`."""
        return self.guided.compile(spec)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns whether it was known."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return False
        for child in parent.children:
            self.scheduler.abort(child.request.request_id)
            self._forget(child.request.request_id)
        return True

    def _forget(self, child_id: str) -> None:
        self.runner.release(child_id)
        if self.speculator is not None:
            self.speculator.release(child_id)
        self._child_to_parent.pop(child_id, None)

    def check_health(self) -> None:
        """Raise if a process this engine runs on has died (a tensor-parallel worker)."""
        if self.tp is not None:
            self.tp.check_workers()

    def shutdown(self) -> None:
        """Stop the engine's other processes, if any (tensor-parallel workers). Idempotent;
        the engine cannot step afterwards."""
        if self._release is not None:
            self._release()  # runs tp.shutdown once, however often it is called

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Pooled hidden states of each prompt, from one prefill-only forward (nothing is
        sampled or kept in the prefix cache). ValueError for input the model cannot take."""
        if self.pooling is None:
            raise ValueError("this model serves text generation; start it with --task embed "
                             "for embeddings")
        for ids in prompts:
            if not ids:
                raise ValueError("the input is empty: at least one token is needed")
            if len(ids) > self.max_model_len:
                raise ValueError(f"the input has {len(ids)} tokens, more than the model's "
                                 f"{self.max_model_len}")
            if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
                raise ValueError(f"token ids must be in [0, {self.model_config.vocab_size})")
        reqs = [Request(f"embed-{next(self._ids)}", list(ids), _EMBED_PARAMS, max_tokens=1,
                        seed=0) for ids in prompts]
        try:
            if not self.runner.is_encoder:  # a decoder's K/V need blocks for this forward
                for r in reqs:
                    if not self.kv.allocate(r, r.num_prompt_tokens):
                        raise ValueError("the KV cache has too few free blocks for these "
                                         "inputs now; retry, or send fewer at once")
            sched = SchedulerOutput([ScheduledRequest(r, r.num_prompt_tokens, 0) for r in reqs])
            return self.runner.embed(sched, self.pooling)
        finally:
            for r in reqs:
                self.kv.free_request(r)

    # ---- the loop body -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns outputs of the requests that changed."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        t0 = time.perf_counter()
        result = self.runner.execute(sched)
        if self.speculator is not None:
            self.speculator.observe(sched, result, time.perf_counter() - t0)
        changed = self.scheduler.update(sched, result)
        touched: dict[str, _Parent] = {}
        now = time.monotonic()
        for req in changed:
            parent_id = self._child_to_parent.get(req.request_id)
            if parent_id is None:
                continue
            parent = self._parents[parent_id]
            child = next(c for c in parent.children if c.request is req)
            if req.first_token_time is None:
                req.first_token_time = now
            stop = self._detokenize(child)
            if stop is not None:  # a stop string wins over length on the same token
                req.stop_reason = stop
                if req.is_finished:
                    req.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            if req.is_finished:
                child.finish_reason = req.status.value
                self._forget(req.request_id)
            touched[parent_id] = parent
        outputs = [self._make_output(p) for p in touched.values()
                   if p.finished or p.params.output_kind is not RequestOutputKind.FINAL_ONLY]
        for p in touched.values():
            if p.finished:
                self._parents.pop(p.request_id, None)
        return outputs

    @staticmethod
    def _detokenize(child: _Child) -> str | None:
        """Feed the child's new tokens to its detokenizer one by one; at a stop string,
        drop the tokens after it (a speculative step can commit several)."""
        req = child.request
        while child.num_detokenized < req.num_output_tokens:
            child.num_detokenized += 1
            stop = child.detok.update([req.output_token_ids[child.num_detokenized - 1]])
            if stop is not None:
                del req.output_token_ids[child.num_detokenized:]
                del req.logprobs[child.num_detokenized:]
                return stop
        return None

    def _make_output(self, parent: _Parent) -> RequestOutput:
        """The parent's output in its kind: everything so far, or (DELTA) what is new."""
        delta = parent.params.output_kind is RequestOutputKind.DELTA
        outs = []
        for i, c in enumerate(parent.children):
            req = c.request
            text = c.detok.output_text(c.finish_reason is not None)
            start = c.tokens_sent if delta else 0
            if delta:
                text = text[c.text_sent:]
                c.text_sent += len(text)
                c.tokens_sent = req.num_output_tokens
            outs.append(CompletionOutput(
                index=i,
                text=text,
                token_ids=req.output_token_ids[start:],
                finish_reason=c.finish_reason,
                stop_reason=req.stop_reason,
                logprobs=self._named(req.logprobs[start:])
                if parent.params.logprobs is not None else None,
            ))
        first = parent.children[0].request
        metrics = {"arrival_time": parent.arrival}
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        prompt_lps = None
        if parent.params.prompt_logprobs is not None and not (delta and parent.sent_any):
            prompt_lps = [None if e is None else self._named([e])[0]
                          for e in first.prompt_logprobs]
        parent.sent_any = True
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids, outputs=outs,
            finished=parent.finished, prompt_logprobs=prompt_lps,
            num_cached_tokens=first.num_cached_tokens, metrics=metrics,
            kind=parent.params.output_kind)

    def _named(self, entries: list[PositionLogprobs]) -> list[PositionLogprobs]:
        """Fill each Logprob's decoded_token (once per entry)."""
        for e in entries:
            for tok, lp in e.items():
                if lp.decoded_token is None:
                    lp.decoded_token = self.tokenizer.id_to_token(tok)
        return entries

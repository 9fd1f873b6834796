"""AsyncEngine: the LLMEngine driven by one background thread, with an asyncio API.

The thread owns the model and the KV cache (no locks around model state); the event
loop talks to it through a command queue (add / abort) and gets outputs back through
one asyncio queue per request. `generate()` is an async iterator: breaking out of it,
or cancelling the task that runs it, aborts the request and frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from yun.config import EngineConfig
from yun.engine.client import EngineStats, ReplicaState
from yun.engine.engine import LLMEngine
from yun.engine.errors import EngineDeadError
from yun.engine.pooling import PoolingConfig
from yun.outputs import RequestOutput, RequestOutputKind
from yun.sampling_params import GuidedDecoding, SamplingParams

log = logging.getLogger("yun.engine")


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    sink: "_Sink"
    grammar: Any = None  # params.guided compiled (compile_grammar), or None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Embed:
    prompts: list[list[int]]
    future: "asyncio.Future[list[list[float]]]"
    loop: asyncio.AbstractEventLoop


async def next_output(q: "asyncio.Queue[RequestOutput | BaseException]") -> RequestOutput:
    """All the outputs waiting in a request's queue as one: the newest (cumulative
    outputs supersede older ones) or their sum (DELTA outputs are merged); an error
    delivered instead is raised."""
    item = await q.get()
    while not q.empty() and not isinstance(item, BaseException):
        item = coalesce(item, q.get_nowait())
    if isinstance(item, BaseException):
        raise item
    return item


def coalesce(older: RequestOutput | BaseException, newer: RequestOutput | BaseException
             ) -> RequestOutput | BaseException:
    """Two successive outputs of one request as one (an error wins)."""
    if (isinstance(older, RequestOutput) and isinstance(newer, RequestOutput)
            and newer.kind is RequestOutputKind.DELTA):
        older.merge(newer)
        return older
    return newer


class _Sink:
    """Delivers outputs from the engine thread into one request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    """One engine in this process behind the `EngineClient` interface (yun/engine/client.py);
    with tensor_parallel_size > 1 its workers sit behind the same LLMEngine."""

    config: EngineConfig
    stats: EngineStats  # refreshed by the engine thread after every step

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)
        self.config = config
        self._commands: queue.Queue[_Add | _Abort | _Embed | None] = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self.stats = EngineStats()
        self._update_stats()

    # ---- the EngineClient interface (yun/engine/client.py) --------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and self._error is None and not self._stopping.is_set())

    @property
    def task(self) -> str:
        """"generate" or "embed" (the model serves /v1/embeddings only)."""
        return self.engine.task

    @property
    def pooling(self) -> PoolingConfig | None:
        """How embeddings are pooled (None when the model serves text generation)."""
        return self.engine.pooling

    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not yet finished (queued commands included)."""
        return len(self._sinks)

    def replica_states(self) -> list[ReplicaState]:
        """One engine, no replicas: []."""
        return []

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="yun-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight and stop the loop."""
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.engine.shutdown()  # its worker processes, if any (after the last step)

    # ---- the public async API ------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None,
                       grammar: Any = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output each time it changes, in `params.output_kind`
        (cumulative, delta or final only); the last is finished.

        Raises ValueError for input the model cannot take, EngineDeadError if the loop died.
        """
        if not self.is_alive:
            raise EngineDeadError(self._dead_message())
        rid = request_id or self.engine.new_request_id()
        sink = _Sink(asyncio.get_running_loop())
        if rid in self._sinks:
            raise ValueError(f"request id {rid!r} is already in use")
        self._sinks[rid] = sink
        self._commands.put(_Add(rid, list(prompt_token_ids), params, prompt, sink, grammar))
        finished = False
        try:
            while True:
                item = await next_output(sink.queue)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._sinks.pop(rid, None)
            if not finished:
                self._commands.put(_Abort(rid))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """One pooled, (per the model) normalised vector per prompt, computed by the engine
        loop between steps; embeddings queued together run as one forward. Raises
        ValueError for input the model cannot take, EngineDeadError if the loop died."""
        if not self.is_alive:
            raise EngineDeadError(self._dead_message())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[float]]] = loop.create_future()
        self._commands.put(_Embed([list(p) for p in prompts], future, loop))
        return await future

    def compile_grammar(self, spec: GuidedDecoding) -> Any:
        """Check and compile a guided-decoding spec now (ValueError naming the problem).

        Thread-safe and blocking (tens of ms for a JSON schema): call it from a worker
        thread before `generate`, and pass what it returns to `generate` as `grammar`,
        so the engine loop neither compiles nor looks it up again.
        """
        return self.engine.compile_grammar(spec)

    # ---- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stopping.is_set():
                eng.check_health()  # a dead worker process fails the loop, even when idle
                block = not eng.has_unfinished()
                if not self._drain(block):
                    break
                if eng.has_unfinished():
                    for out in eng.step():
                        sink = self._sinks.get(out.request_id)
                        if sink is not None:
                            sink.put(out)
                    self.stats.steps += 1
                self._update_stats()
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop crashed")
            self._error = e
        finally:
            err = EngineDeadError(self._dead_message())
            while True:  # embeddings still queued fail too (generations below)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Embed):
                    _resolve(cmd, error=err)
            for rid in list(self._sinks):
                self._sinks[rid].put(err)
                eng.abort(rid)
            self._update_stats()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; wait for one if idle. False when asked to stop."""
        embeds: list[_Embed] = []
        try:
            return self._apply(block, embeds)
        finally:
            self._run_embeds(embeds)

    def _run_embeds(self, embeds: list[_Embed]) -> None:
        """The embeddings queued in one drain, as one forward (each request's error its
        own: a bad one is retried alone so it fails only itself)."""
        if not embeds:
            return
        try:
            vectors = self.engine.embed([p for e in embeds for p in e.prompts])
        except ValueError as err:
            if len(embeds) > 1:
                for e in embeds:
                    self._run_embeds([e])
                return
            _resolve(embeds[0], error=err)
            return
        at = 0
        for e in embeds:
            _resolve(e, vectors[at:at + len(e.prompts)])
            at += len(e.prompts)

    def _apply(self, block: bool, embeds: list[_Embed]) -> bool:
        while True:
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return not self._stopping.is_set()
            block = False
            if cmd is None:
                return False
            if isinstance(cmd, _Embed):
                embeds.append(cmd)
                continue
            if isinstance(cmd, _Abort):
                self.engine.abort(cmd.request_id)
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params,
                                        cmd.prompt, cmd.grammar)
            except ValueError as e:
                cmd.sink.put(e)

    def _update_stats(self) -> None:
        eng = self.engine
        kv = eng.kv.stats()
        s = self.stats
        s.num_running, s.num_waiting = eng.num_running, eng.num_waiting
        s.kv_usage, s.num_free_blocks, s.num_blocks = kv.usage, kv.num_free_blocks, kv.num_blocks
        s.prefix_cache_queries, s.prefix_cache_hits = kv.prefix_queries, kv.prefix_hits
        s.num_preemptions = eng.scheduler.num_preemptions
        if eng.speculator is not None:
            spec = eng.speculator.stats
            s.spec_proposed, s.spec_accepted = list(spec.proposed), list(spec.accepted)
            s.spec_proposer_seconds = spec.proposer_seconds
            s.spec_proposer_steps = spec.num_proposer_steps

    def _dead_message(self) -> str:
        if self._error is not None:
            return f"the engine loop crashed: {self._error!r}"
        return "the engine is not running"


def _resolve(cmd: _Embed, vectors: list[list[float]] | None = None,
             error: BaseException | None = None) -> None:
    """Hand an embedding's result (or error) to the event loop that awaits it."""
    def settle() -> None:
        if cmd.future.done():  # the client left
            return
        if error is not None:
            cmd.future.set_exception(error)
        else:
            cmd.future.set_result(vectors or [])

    try:
        cmd.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats"]

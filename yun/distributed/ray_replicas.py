"""Serving replicas on Ray: N full engines, each in its own Ray actor, behind one HTTP
front end that routes every request to one of them.

    yun serve MODEL --replicas 2                       # a local Ray cluster, on loopback
    yun serve MODEL --ray-address auto --replicas 4    # join a cluster made by `ray start`

`RayReplicas` is what the server sees: the `EngineClient` interface
(yun/engine/client.py), as AsyncEngine, with `replica_states()` filled in for /health
and /metrics.

- A replica (`Replica`, an actor that Ray restarts when it dies) runs an AsyncEngine.
  Requests go in with `add`; outputs come back on one long-lived stream per replica
  (`outputs`) in batches holding the newest output of each request that changed: a busy
  replica sends about one message per engine step, not one per request and token.
- Routing (`Router`) is prefix-aware by default: the replica that most recently took the
  longest run of the prompt's first full KV blocks (a hash chain, as the KV cache names
  blocks) most likely still holds them in its prefix cache; unless it has more than
  `max_imbalance` requests in flight beyond the least-loaded healthy replica, which then
  takes the request (and holds that prefix too from then on).
- Failures: when a replica's actor dies, its requests in flight fail (EngineDeadError: a
  503 to the client, an error event on a stream); new requests go to the healthy
  replicas; Ray restarts the actor (the model loads again) and it rejoins. A replica
  whose engine loop crashed is killed, so that Ray restarts it too.

Ray is imported here only, and only when replicas are asked for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, AsyncIterator, Sequence

from yun.config import EngineConfig, ModelConfig
from yun.engine.async_engine import coalesce, next_output
from yun.engine.client import EngineStats, ReplicaState
from yun.engine.errors import EngineDeadError
from yun.engine.pooling import PoolingConfig
from yun.model_source import resolve_model
from yun.outputs import RequestOutput
from yun.sampling_params import SamplingParams
from yun.tokenizer import Tokenizer

log = logging.getLogger("yun.replicas")

ROUTING_POLICIES = ("prefix", "least-loaded", "round-robin")
POLL_INTERVAL_S = 0.5  # replica stats (and engine liveness) are read this often
CALL_TIMEOUT_S = 5.0  # a replica that takes longer to answer a probe is not up (yet)


def import_ray(local: bool):
    """Ray, on first use. `local`: a cluster started in this process binds to loopback
    only (otherwise Ray advertises the machine's network address, for other machines)."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # = single-node mode
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("serving replicas needs Ray: pip install 'yun[ray]'") from e
    return ray


# ---- routing -------------------------------------------------------------------------------
class Router:
    """Which replica takes a request. Policies: prefix (default), least-loaded,
    round-robin. Pure bookkeeping: no Ray, no I/O."""

    def __init__(self, num_replicas: int, block_size: int, policy: str = "prefix",
                 max_imbalance: int = 8, max_blocks: int = 64, capacity: int = 1 << 16):
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {policy!r}")
        self.n, self.block_size, self.policy = num_replicas, block_size, policy
        self.max_imbalance, self.max_blocks, self.capacity = max_imbalance, max_blocks, capacity
        self._holders: OrderedDict[int, set[int]] = OrderedDict()  # prefix hash -> replicas
        self._assigned = [0] * num_replicas  # breaks ties: sequential requests alternate
        self._next = 0  # round-robin

    def prefix_hashes(self, prompt: Sequence[int]) -> list[int]:
        """One hash per full block of the first `max_blocks` blocks, each covering every
        token before it (a chain, like the KV cache's names for blocks)."""
        bs, h, out = self.block_size, 0, []
        for i in range(min(len(prompt) // bs, self.max_blocks)):
            h = hash((h, tuple(prompt[i * bs:(i + 1) * bs])))
            out.append(h)
        return out

    def choose(self, prompt: Sequence[int], loads: Sequence[int],
               healthy: Sequence[bool]) -> int:
        """The replica for this prompt; `loads` are requests in flight per replica.
        Raises EngineDeadError when no replica is healthy."""
        up = [i for i in range(self.n) if healthy[i]]
        if not up:
            raise EngineDeadError("no replica is running")
        if self.policy == "round-robin":
            while not healthy[self._next % self.n]:
                self._next += 1
            self._next += 1
            return (self._next - 1) % self.n
        def lightest(candidates: Sequence[int]) -> int:
            return min(candidates, key=lambda i: (loads[i], self._assigned[i], i))

        choice = least = lightest(up)
        if self.policy == "prefix":
            chain = self.prefix_hashes(prompt)
            for h in reversed(chain):  # the longest run first
                holders = [i for i in self._holders.get(h, ()) if healthy[i]]
                if holders:
                    best = lightest(holders)
                    if loads[best] - loads[least] <= self.max_imbalance:
                        choice = best
                    break
            self._remember(chain, choice)
        self._assigned[choice] += 1
        return choice

    def _remember(self, chain: list[int], replica: int) -> None:
        for h in chain:
            self._holders.setdefault(h, set()).add(replica)
            self._holders.move_to_end(h)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def forget(self, replica: int) -> None:
        """The replica lost its cache (it restarted)."""
        for h in list(self._holders):
            held = self._holders[h]
            held.discard(replica)
            if not held:
                del self._holders[h]


# ---- the actor -----------------------------------------------------------------------------
class Replica:
    """One full engine, run by Ray as an actor: its methods are called remotely."""

    def __init__(self, config: EngineConfig):
        from yun.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(config)
        self.engine.start()
        self._outbox: dict[str, RequestOutput | Exception] = {}
        self._ready = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "max_model_len": self.engine.max_model_len,
                "task": self.engine.task, "pooling": self.engine.pooling}

    def stats(self) -> dict[str, Any]:
        return {**asdict(self.engine.stats), "alive": self.engine.is_alive,
                "pid": os.getpid()}

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  prompt: str | None) -> None:
        self._tasks[request_id] = asyncio.create_task(
            self._run(request_id, prompt_token_ids, params, prompt))

    async def _run(self, request_id: str, prompt_token_ids: list[int],
                   params: SamplingParams, prompt: str | None) -> None:
        try:
            async for out in self.engine.generate(prompt_token_ids, params, request_id,
                                                  prompt):
                self._post(request_id, out)
        except ValueError as e:  # the input: a 400 at the front end
            self._post(request_id, ValueError(str(e)))
        except Exception as e:  # noqa: BLE001 - the engine died: a 503 there
            self._post(request_id, EngineDeadError(str(e)))
        finally:
            self._tasks.pop(request_id, None)

    def _post(self, request_id: str, item: RequestOutput | Exception) -> None:
        old = self._outbox.get(request_id)  # the newest cumulative output, or the deltas' sum
        self._outbox[request_id] = item if old is None else coalesce(old, item)
        self._ready.set()

    async def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # AsyncEngine.generate aborts it in the engine

    async def outputs(self) -> AsyncIterator[dict[str, RequestOutput | Exception]]:
        """Batches of {request id: newest output or error}, as they come (one consumer)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._outbox = self._outbox, {}
            yield batch

    async def compile_grammar(self, spec: Any) -> None:
        await asyncio.to_thread(self.engine.compile_grammar, spec)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        try:
            return await self.engine.embed(prompts)
        except ValueError as e:  # the input: a 400 at the front end
            raise ValueError(str(e)) from None


# ---- the front end's view ------------------------------------------------------------------
@dataclass
class _ReplicaState:
    index: int
    actor: Any
    healthy: bool = False
    pid: int | None = None
    restarts: int = 0
    routed: int = 0
    max_model_len: int = 0
    requests: dict[str, asyncio.Queue] = field(default_factory=dict)  # in flight
    stats: dict[str, Any] = field(default_factory=dict)


def _release_replicas(ray: Any, actors: list[Any], owns_ray: bool) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if owns_ray and ray.is_initialized():
        ray.shutdown()


class RayReplicas:
    """N replicas on Ray behind the `EngineClient` interface. Loads every replica before
    returning; `start()` (from the server's event loop) begins listening to them."""

    config: EngineConfig  # max_num_seqs: all replicas together
    model_config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int  # the smallest replica's
    task: str
    pooling: PoolingConfig | None
    stats: EngineStats  # the healthy replicas' sums, refreshed every POLL_INTERVAL_S

    def __init__(self, config: EngineConfig, replicas: int = 1, address: str | None = None,
                 routing: str = "prefix", max_imbalance: int = 8,
                 start_timeout: float = 900.0):
        if replicas < 1:
            raise ValueError(f"replicas must be positive, got {replicas}")
        self.ray = ray = import_ray(local=address is None)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        path = resolve_model(config.model)  # the front end tokenizes: it needs the files
        self.model_config = ModelConfig.load(path)
        self.tokenizer = Tokenizer.load(path)
        self.router = Router(replicas, config.block_size, routing, max_imbalance)
        actor = ray.remote(Replica).options(max_restarts=-1, max_task_retries=0,
                                            **self._resources(config, replicas))
        replica_config = replace(config, num_threads=self._threads(config, replicas))
        self._replicas = [_ReplicaState(i, actor.remote(replica_config))
                          for i in range(replicas)]
        # The actors (and Ray, if started here) go when this object does, not only on
        # shutdown(); the finalizer holds the actor handles, not the front end.
        self._release = weakref.finalize(self, _release_replicas, ray,
                                         [r.actor for r in self._replicas], self._owns_ray)
        try:
            infos = ray.get([r.actor.info.remote() for r in self._replicas],
                            timeout=start_timeout)
        except BaseException:
            self.shutdown()
            raise
        for r, info in zip(self._replicas, infos):
            r.pid, r.max_model_len, r.healthy = info["pid"], info["max_model_len"], True
        self.max_model_len = min(r.max_model_len for r in self._replicas)
        self.task, self.pooling = infos[0]["task"], infos[0]["pooling"]
        # What admission control reads: the service runs N x max_num_seqs at once.
        self.config = replace(config, max_num_seqs=config.max_num_seqs * replicas)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _threads(self, config: EngineConfig, replicas: int) -> int:
        if config.num_threads:
            return config.num_threads
        return max(1, (os.cpu_count() or 1) // replicas)  # this machine's cores, shared

    def _resources(self, config: EngineConfig, replicas: int) -> dict[str, float]:
        gpus = 0
        if config.device.startswith("cuda") or (
                config.device == "auto" and self.ray.cluster_resources().get("GPU", 0) > 0):
            gpus = config.tensor_parallel_size
        return {"num_cpus": self._threads(config, replicas), "num_gpus": gpus}

    # ---- what the server reads -----------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return not self._closed and any(r.healthy for r in self._replicas)

    @property
    def num_unfinished(self) -> int:
        return sum(len(r.requests) for r in self._replicas)

    def replica_states(self) -> list[ReplicaState]:
        """Per-replica state for /health and /metrics."""
        out = []
        for r in self._replicas:
            s = r.stats
            queries = s.get("prefix_cache_queries", 0)
            out.append({
                "replica": r.index, "healthy": r.healthy, "pid": r.pid,
                "restarts": r.restarts, "routed": r.routed, "in_flight": len(r.requests),
                "num_running": s.get("num_running", 0), "num_waiting": s.get("num_waiting", 0),
                "kv_usage": s.get("kv_usage", 0.0),
                "prefix_cache_hit_rate": s.get("prefix_cache_hits", 0) / queries if queries
                else 0.0})
        return out

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin listening to the replicas; call it from the event loop that serves."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._listen(r)) for r in self._replicas]
        self._tasks.append(self._loop.create_task(self._watch()))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is in flight, stop the replicas (and Ray, if started here)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop_tasks)
            except RuntimeError:  # the loop is gone
                pass
        release = getattr(self, "_release", None)
        if release is not None:
            release()  # kills the actors (and stops Ray if started here) once
        elif self._owns_ray:
            self.ray.shutdown()

    def __enter__(self) -> "RayReplicas":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _stop_tasks(self) -> None:
        for r in self._replicas:
            self._fail_requests(r, "the server is shutting down")
        for t in self._tasks:
            t.cancel()

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None,
                       grammar: Any = None) -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate, on the replica the router picks. Raises ValueError for
        input the model cannot take, EngineDeadError if no replica runs or the replica
        running the request died. `grammar` stays here (compile_grammar returns None):
        the replica finds `params.guided` in its own cache, compiled by compile_grammar."""
        rid = request_id or f"req-{next(self._ids)}"
        if any(rid in r.requests for r in self._replicas):
            raise ValueError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        r = await self._submit(rid, list(prompt_token_ids), params, prompt, queue)
        finished = False
        try:
            while True:
                item = await next_output(queue)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if r.requests.pop(rid, None) is not None and not finished:
                self._abort_on(r, rid)  # the client left: free its slot on the replica

    async def _submit(self, rid: str, ids: list[int], params: SamplingParams,
                      prompt: str | None, queue: asyncio.Queue) -> _ReplicaState:
        """Hand the request to the chosen replica; one that cannot take it (it died and
        nobody has noticed yet) is skipped for the next choice."""
        skip: set[int] = set()
        while True:
            healthy = [r.healthy and r.index not in skip for r in self._replicas]
            loads = [len(r.requests) for r in self._replicas]
            r = self._replicas[self.router.choose(ids, loads, healthy)]
            r.requests[rid] = queue  # before `add`: its first output may come at once
            call = r.actor.add.remote(rid, ids, params, prompt)
            try:
                await call
            except asyncio.CancelledError:
                r.requests.pop(rid, None)
                self._abort_on(r, rid)
                raise
            except Exception as e:  # noqa: BLE001 - Ray's actor errors
                r.requests.pop(rid, None)
                log.warning("replica %d did not take a request: %s", r.index, _short(e))
                skip.add(r.index)
                continue
            r.routed += 1
            return r

    def abort(self, request_id: str) -> None:
        for r in self._replicas:
            if r.requests.pop(request_id, None) is not None:
                self._abort_on(r, request_id)

    def _abort_on(self, r: _ReplicaState, rid: str) -> None:
        try:
            r.actor.abort.remote(rid)  # fire and forget; a dead replica holds nothing
        except Exception:  # noqa: BLE001
            pass

    def compile_grammar(self, spec: Any) -> Any:
        """Check and compile a guided-decoding spec on every healthy replica (blocking).
        Returns None: a compiled grammar does not travel to a replica."""
        refs = [r.actor.compile_grammar.remote(spec) for r in self._replicas if r.healthy]
        try:
            self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(str(e.cause)) from None
            raise

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """As AsyncEngine.embed, on the least-loaded healthy replica."""
        up = [r for r in self._replicas if r.healthy]
        if self._closed or not up:
            raise EngineDeadError("no replica is running")
        r = min(up, key=lambda r: len(r.requests))
        try:
            return await r.actor.embed.remote(prompts)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(str(e.cause)) from None
            raise EngineDeadError(f"replica {r.index} failed: {_short(e)}") from None
        except self.ray.exceptions.RayActorError as e:
            raise EngineDeadError(f"replica {r.index} died: {_short(e)}") from None

    # ---- background tasks ----------------------------------------------------------------
    async def _listen(self, r: _ReplicaState) -> None:
        """Deliver replica r's outputs; when it dies, fail its requests, wait for Ray to
        restart it, and listen again."""
        while not self._closed:
            try:
                stream = r.actor.outputs.options(num_returns="streaming").remote()
                async for ref in stream:
                    for rid, item in (await ref).items():
                        queue = r.requests.get(rid)
                        if queue is not None:
                            queue.put_nowait(item)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray's actor errors
                if self._closed:
                    return
                log.warning("replica %d (pid %s) is down: %s", r.index, r.pid, _short(e))
            r.healthy = False
            self.router.forget(r.index)
            self._fail_requests(r, f"replica {r.index} (pid {r.pid}) died while running "
                                   "this request; retry")
            await self._until_up(r)

    async def _until_up(self, r: _ReplicaState) -> None:
        while not self._closed:
            try:
                info = await asyncio.wait_for(_awaitable(r.actor.info.remote()),
                                              CALL_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - still restarting
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            if info["pid"] != r.pid:
                r.restarts += 1
                log.warning("replica %d is back (pid %s)", r.index, info["pid"])
            r.pid, r.stats, r.healthy = info["pid"], {}, True
            return

    async def _watch(self) -> None:
        """Read every replica's stats; restart one whose engine loop died."""
        while not self._closed:
            for r in self._replicas:
                if not r.healthy:
                    continue
                try:
                    s = await asyncio.wait_for(_awaitable(r.actor.stats.remote()),
                                               CALL_TIMEOUT_S)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the listener handles deaths
                    continue
                r.stats = s
                if not s["alive"] and r.healthy:
                    log.warning("replica %d's engine stopped; restarting it", r.index)
                    self.ray.kill(r.actor, no_restart=False)
            self._aggregate()
            await asyncio.sleep(POLL_INTERVAL_S)

    def _aggregate(self) -> None:
        up = [r.stats for r in self._replicas if r.healthy and r.stats]
        agg = self.stats
        for name in ("num_running", "num_waiting", "num_free_blocks", "num_blocks",
                     "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "steps"):
            setattr(agg, name, sum(s[name] for s in up))
        agg.kv_usage = 1 - agg.num_free_blocks / agg.num_blocks if agg.num_blocks else 0.0

    def _fail_requests(self, r: _ReplicaState, message: str) -> None:
        for queue in r.requests.values():
            queue.put_nowait(EngineDeadError(message))
        r.requests.clear()


async def _awaitable(ref: Any) -> Any:
    return await ref


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"

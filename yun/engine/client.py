"""EngineClient: the one interface the server uses to talk to an engine.

Implemented by `AsyncEngine` (one engine in this process, tensor-parallel or not: its
workers sit behind the same `LLMEngine`) and by `RayReplicas` (N engines on Ray behind
one front end). The server (yun/server) reads nothing else of an engine: what does not
apply to an implementation is still declared and returns empty (`replica_states()` is
[] for a single engine).

No torch here (a leaf: the server imports it for its types).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from yun.config import EngineConfig, ModelConfig
    from yun.engine.pooling import PoolingConfig
    from yun.outputs import RequestOutput
    from yun.sampling_params import GuidedDecoding, SamplingParams
    from yun.tokenizer import Tokenizer

TASKS = ("generate", "embed")


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges, read by /metrics at scrape time."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    steps: int = 0
    # Speculative decoding, per proposal position (0 = first): tokens proposed, accepted.
    spec_proposed: list[int] = field(default_factory=list)
    spec_accepted: list[int] = field(default_factory=list)
    spec_proposer_seconds: float = 0.0  # time spent proposing (a draft model's forwards)
    spec_proposer_steps: int = 0  # steps in which the proposer was asked for tokens


# One replica's state for /health and /metrics: replica, healthy, pid, restarts, routed,
# in_flight, num_running, num_waiting, kv_usage, prefix_cache_hit_rate.
ReplicaState = dict[str, Any]


@runtime_checkable
class EngineClient(Protocol):
    """What the server needs of an engine. Raises: ValueError for input the model cannot
    take (a 400), EngineDeadError when the engine stopped (a 503)."""

    # Configuration. `config.max_num_seqs` is what the whole service runs at once.
    config: "EngineConfig"
    model_config: "ModelConfig"
    tokenizer: "Tokenizer"
    max_model_len: int
    task: str  # one of TASKS: "embed" models serve /v1/embeddings only
    pooling: "PoolingConfig | None"  # how embeddings are pooled; None for "generate"

    # State.
    stats: EngineStats  # updated in place by the engine; read at scrape time
    is_alive: bool
    num_unfinished: int  # requests accepted and not finished

    def replica_states(self) -> list[ReplicaState]:
        """One entry per serving replica; [] for a single engine."""
        ...

    # Lifecycle.
    def start(self) -> None:
        """Begin serving; called from the event loop that will call `generate`."""
        ...

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is in flight and stop. Idempotent."""
        ...

    # Requests.
    def generate(self, prompt_token_ids: list[int], params: "SamplingParams",
                 request_id: str | None = None, prompt: str | None = None,
                 grammar: Any = None) -> AsyncIterator["RequestOutput"]:
        """The request's outputs as they change, shaped by `params.output_kind`
        (cumulative, deltas, or the final one only); the last one is finished. Closing
        the iterator early aborts the request. `grammar`: what `compile_grammar` returned
        for `params.guided`, so the engine does not look it up again."""
        ...

    def abort(self, request_id: str) -> None:
        ...

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """One pooled vector per prompt (ValueError when the model serves generation)."""
        ...

    def compile_grammar(self, spec: "GuidedDecoding") -> Any:
        """Check and compile a guided-decoding spec now (blocking: call it from a worker
        thread); ValueError naming the problem. Returns the compiled grammar, an opaque
        handle for `generate` (None where it cannot travel: each Ray replica keeps its
        own, compiled here and found in its cache at `generate`)."""
        ...


__all__ = ["EngineClient", "EngineStats", "ReplicaState", "TASKS"]

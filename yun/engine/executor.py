"""The runner seam: what LLMEngine needs of the thing that runs the model.

`ModelRunner` (yun/engine/runner.py) is the real one; an engine built with
`LLMEngine(config, runner=...)` uses the given one instead (tests drive the scheduler,
stop conditions, preemption and aborts with a scripted runner, no model). No torch here.

A runner may also offer `num_window_blocks` and `group_window` (ModelRunner does): a
model mixing sliding and full layers then gets two KV-cache groups (yun/engine/kv_groups.py),
`allocate_kv_cache` returning the full group's blocks. Without them: one group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from yun.engine.pooling import PoolingConfig
    from yun.engine.scheduler import RunnerOutput, SchedulerOutput


@runtime_checkable
class Runner(Protocol):
    device: "torch.device"  # where the model runs ("cpu": smaller default token budget)

    @property
    def is_encoder(self) -> bool:
        """An encoder model: no KV cache, embeddings only."""
        ...

    def allocate_kv_cache(self, memory_bytes: int | None) -> int:
        """Reserve the KV cache (None: the device's default share); the number of blocks."""
        ...

    def execute(self, sched: "SchedulerOutput") -> "RunnerOutput":
        """Run one step: the tokens each sampling request commits (and logprobs)."""
        ...

    def embed(self, sched: "SchedulerOutput", pooling: "PoolingConfig") -> list[list[float]]:
        """One prefill-only forward, pooled: a vector per scheduled request."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request's per-request state."""
        ...


__all__ = ["Runner"]

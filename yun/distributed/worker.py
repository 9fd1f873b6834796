"""A tensor-parallel worker: rank 1, 2, ... of one engine.

    python -m yun.distributed.worker CONFIG_JSON      (with torchrun's variables set)

It loads the same model with the same runner code, keeps its shard, allocates its share
of the KV cache, then runs every forward pass rank 0 sends (`StepMessage`), and the
logits rows it asks for, until `StopMessage`. It sends nothing back. If rank 0 goes
away, the next wait fails (its sockets closed) and the worker exits.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from yun.config import EngineConfig, ModelConfig
from yun.distributed.parallel import (LogitsMessage, Rendezvous, StepMessage, StopMessage,
                                      TensorParallel, connect)


def run_worker(config: EngineConfig, rdv: Rendezvous) -> None:
    """Join the group as rank `rdv.rank` and serve rank 0 until told to stop."""
    from yun.engine.runner import ModelRunner
    from yun.model_source import resolve_model

    model_config = ModelConfig.load(resolve_model(config.model))
    tp = connect(config, rdv)
    try:
        runner = ModelRunner(model_config, tp.config, tp)
        runner.allocate_kv_cache(config.kv_cache_memory)
        serve_steps(runner, tp)
    finally:
        tp.shutdown()


@torch.inference_mode()
def serve_steps(runner, tp: TensorParallel) -> None:
    hidden = None  # [T, E] of the last step, for LogitsMessage
    while True:
        msg = tp.recv()
        if isinstance(msg, StopMessage):
            return
        if isinstance(msg, StepMessage):
            hidden = runner.run_model(msg.inputs)
            rows = msg.logits_rows
        elif isinstance(msg, LogitsMessage):
            rows = msg.rows
        else:
            raise TypeError(f"unexpected message from rank 0: {type(msg).__name__}")
        if rows is not None:  # the vocab-parallel head gathers the slices on rank 0
            runner.compute_logits(hidden[rows])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m yun.distributed.worker CONFIG_JSON (with torchrun's RANK, "
              "WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)", file=sys.stderr)
        return 2
    rdv = Rendezvous.from_environ(os.environ)
    if rdv is None or rdv.rank == 0:
        print("yun worker: RANK (>= 1) and WORLD_SIZE must be set", file=sys.stderr)
        return 2
    config = EngineConfig(**json.loads(args[0]))
    try:
        run_worker(config, rdv)
    except RuntimeError as e:  # rank 0 went away: its sockets closed under a wait
        print(f"yun worker rank {rdv.rank}: stopping: {str(e)[:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor-parallel ranks on torch.distributed: starting them, joining them, and the
small typed messages rank 0 sends them.

Rank 0 is the engine's own process: it schedules, and before each forward pass sends
the scheduled batch to the other ranks (the workers, see `worker.py`) as one message.
Workers send nothing back; outputs come from rank 0.

Two process groups join the ranks:
- data (gloo on CPU, NCCL on CUDA): the model's collectives (one all-reduce per
  row-parallel block, the vocab-parallel embedding's all-reduce, the logits gather).
  Its timeout bounds how long a rank waits for a stuck peer.
- control (gloo, on CPU): the step messages. A worker waits there as long as the server
  is idle, so its timeout is long. A peer that dies closes its sockets, which fails a
  wait on it at once: a dead rank is an error, never a hang.

Ranks come from one of two places: yun starts `tensor_parallel_size - 1` worker
processes on this machine, or torchrun started every rank (across machines too). This
module is the one place that reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); workers that yun starts get the same ones.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from yun.config import EngineConfig, ModelConfig

DATA_TIMEOUT = timedelta(minutes=5)  # a collective waits this long for a stuck peer
CONTROL_TIMEOUT = timedelta(days=365)  # an idle worker waits this long for the next step
START_TIMEOUT_S = 300.0  # every rank reaches the rendezvous within this
JOINED = "yun/tp/joined"  # rendezvous key: how many workers have connected


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot go on."""


@dataclass(frozen=True)
class Rendezvous:
    """Where a rank is and how it finds rank 0, torchrun-style."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks on this machine (they share its CPU cores)
    master_addr: str
    master_port: int
    agent_store: bool = False  # torchrun's agent hosts the rendezvous store, not rank 0

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> "Rendezvous | None":
        """torchrun's variables, or None when this process was not started that way."""
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return cls(rank, world, int(env.get("LOCAL_RANK", rank)),
                   int(env.get("LOCAL_WORLD_SIZE", world)),
                   env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")),
                   env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")

    def environ(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


# ---- messages from rank 0 ------------------------------------------------------------------
@dataclass
class StepMessage:
    """One forward pass: the runner's StepInputs (without its requests), and the rows of
    the hidden states whose logits rank 0 computes right after (None: none)."""

    inputs: Any
    logits_rows: torch.Tensor | None


@dataclass
class LogitsMessage:
    """Logits of more rows of the last step's hidden states (prompt logprobs)."""

    rows: torch.Tensor


@dataclass
class StopMessage:
    """Leave the worker loop."""


@dataclass
class _Array:
    """A tensor in transit: numpy pickles fast and carries no device."""

    data: np.ndarray


def to_host(obj: Any) -> Any:
    """Tensors -> _Array, through dataclasses, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return _Array(obj.detach().cpu().numpy())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: to_host(getattr(obj, f.name))
                               for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """The inverse of `to_host`, onto `device`."""
    if isinstance(obj, _Array):
        return torch.from_numpy(obj.data).to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                               for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# ---- one rank's view of the group ----------------------------------------------------------
class TensorParallel:
    """This rank's place in the tensor-parallel group. The runner and the sharded model
    get it explicitly; nothing reads it from a global."""

    def __init__(self, rank: int, world_size: int, config: EngineConfig, device: torch.device,
                 workers: list[subprocess.Popen], owns_group: bool):
        self.rank, self.world_size = rank, world_size
        self.config = config  # this rank's settings: its device, its share of the threads
        self.device = device
        self.group = dist.group.WORLD
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.workers = workers  # rank 0 only: the processes it started (ranks 1, 2, ...)
        self._owns_group = owns_group
        self._closed = False

    # ---- collectives of the sharded model ----------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        try:
            dist.all_reduce(x, group=self.group)
        except RuntimeError as e:
            raise self._failure(e) from e
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's x side by side on the last dim; other ranks: None."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        try:
            dist.gather(x, parts, dst=0, group=self.group)
        except RuntimeError as e:
            raise self._failure(e) from e
        return None if parts is None else torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        except RuntimeError as e:
            raise self._failure(e) from e
        return int(t.item())

    # ---- messages ----------------------------------------------------------------------
    def send_step(self, inputs: Any, logits_rows: torch.Tensor | None) -> None:
        """Rank 0: the workers run this forward pass (StepInputs' requests stay here)."""
        self._send(StepMessage(replace(inputs, order=[], q_starts=[]), logits_rows))

    def send_logits_rows(self, rows: torch.Tensor) -> None:
        self._send(LogitsMessage(rows))

    def _send(self, msg: Any) -> None:
        self.check_workers()
        try:
            dist.broadcast_object_list([to_host(msg)], src=0, group=self.control)
        except RuntimeError as e:
            raise self._failure(e) from e

    def recv(self) -> Any:
        """Workers: the next message from rank 0 (waits while the server is idle)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return to_device(box[0], self.device)

    # ---- health and shutdown -----------------------------------------------------------
    def check_workers(self) -> None:
        """Rank 0: raise WorkerDiedError if a worker it started has exited."""
        for rank, proc in enumerate(self.workers, start=1):
            code = proc.poll()
            if code is not None:
                raise WorkerDiedError(
                    f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_exit_reason(code)}")

    def _failure(self, err: Exception) -> WorkerDiedError:
        """The clearest error for a failed collective: the dead worker by name when it is
        ours (its exit is seen a moment after its sockets close), else torch's words."""
        deadline = time.monotonic() + 2.0
        while self.workers and time.monotonic() < deadline:
            try:
                self.check_workers()
            except WorkerDiedError as died:
                return died
            time.sleep(0.05)
        return WorkerDiedError(f"a tensor-parallel collective failed (a rank died or stopped "
                               f"answering): {str(err)[:300]}")

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (rank 0) and leave the group. Idempotent. graceful=False
        terminates the workers without a word (they may be inside a collective)."""
        if self._closed:
            return
        self._closed = True
        if self.rank == 0:
            if graceful:
                try:
                    self._send(StopMessage())
                except Exception:  # a rank is gone: the others see their sockets close
                    pass
            stop_processes(self.workers, timeout=10.0 if graceful else 0.0)
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---- starting and joining ------------------------------------------------------------------
def start_tensor_parallel(config: EngineConfig, model_config: ModelConfig) -> TensorParallel:
    """Rank 0's side: start the other ranks on this machine (or find those torchrun
    started) and connect them. Raises ValueError for a model that does not split."""
    from yun.distributed.tp import check_shardable

    world = config.tensor_parallel_size
    check_shardable(model_config, world)
    rdv = Rendezvous.from_environ(os.environ)
    workers: list[subprocess.Popen] = []
    if rdv is None:  # one machine: yun starts the workers itself
        rdv = Rendezvous(0, world, 0, world, "127.0.0.1", _free_port())
        worker_config = replace(config, model=model_config.path)
        workers = [_spawn_worker(worker_config, replace(rdv, rank=r, local_rank=r))
                   for r in range(1, world)]
    elif rdv.world_size != world:
        raise ValueError(f"tensor_parallel_size={world} but torchrun started "
                         f"WORLD_SIZE={rdv.world_size} ranks")
    elif rdv.rank != 0:
        raise RuntimeError(f"rank {rdv.rank} runs a worker, not an engine: start it with "
                           "`yun serve` (which does so) or `python -m yun.distributed.worker`")
    try:
        return connect(config, rdv, workers)
    except BaseException:
        stop_processes(workers)
        raise


def connect(config: EngineConfig, rdv: Rendezvous,
            workers: list[subprocess.Popen] | None = None) -> TensorParallel:
    """Join this rank to the group. Rank 0 waits for the others while watching the
    workers it started, so one that fails to start is an error at once."""
    device = _rank_device(config, rdv)
    config = _rank_config(config, rdv, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized() and rdv.rank == 0:
        gc.collect()  # an engine dropped inside a reference cycle: its finalizer leaves
    owns = not dist.is_initialized()
    if owns:
        store = dist.TCPStore(rdv.master_addr, rdv.master_port, rdv.world_size,
                              is_master=rdv.rank == 0 and not rdv.agent_store,
                              wait_for_workers=False, timeout=timedelta(seconds=START_TIMEOUT_S))
        if rdv.rank == 0:
            _await_workers(store, rdv.world_size, workers or [])
        else:
            store.add(JOINED, 1)
        dist.init_process_group(backend, store=store, rank=rdv.rank,
                                world_size=rdv.world_size, timeout=DATA_TIMEOUT)
    elif Rendezvous.from_environ(os.environ) is None or dist.get_world_size() != rdv.world_size:
        raise RuntimeError("torch.distributed is already initialized in this process (is "
                           "another tensor-parallel engine still running? shut it down first)")
    return TensorParallel(rdv.rank, rdv.world_size, config, device, workers or [], owns)


def _await_workers(store: dist.TCPStore, world: int, workers: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while store.add(JOINED, 0) < world - 1:
        for rank, proc in enumerate(workers, start=1):
            if (code := proc.poll()) is not None:
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
                                      f"{_exit_reason(code)} while starting")
        if time.monotonic() > deadline:
            raise WorkerDiedError(f"tensor-parallel ranks did not all connect within "
                                  f"{START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _rank_device(config: EngineConfig, rdv: Rendezvous) -> torch.device:
    from yun.engine.device import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":  # one GPU per rank on its machine
        if rdv.local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rdv.rank} needs GPU {rdv.local_rank}, but this machine "
                             f"has {torch.cuda.device_count()}")
        device = torch.device("cuda", rdv.local_rank)
        torch.cuda.set_device(device)
    return device


def _rank_config(config: EngineConfig, rdv: Rendezvous, device: torch.device) -> EngineConfig:
    """This rank's device, and (unless set) its share of this machine's CPU cores."""
    from yun.engine.device import default_threads

    threads = config.num_threads or max(1, default_threads() // rdv.local_world_size)
    return replace(config, device=str(device), num_threads=threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- worker processes ----------------------------------------------------------------------
_STARTED: set[subprocess.Popen] = set()  # stopped at exit if nobody shut them down


def _spawn_worker(config: EngineConfig, rdv: Rendezvous) -> subprocess.Popen:
    """`python -m yun.distributed.worker CONFIG_JSON` with torchrun's variables set."""
    cmd = [sys.executable, "-m", "yun.distributed.worker",
           json.dumps(dataclasses.asdict(config))]
    proc = subprocess.Popen(cmd, env={**os.environ, **rdv.environ()})
    _STARTED.add(proc)
    return proc


def stop_processes(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> None:
    """Wait for each to exit (it was told to), then terminate, then kill."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _STARTED.discard(proc)


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_STARTED):
        if proc.poll() is None:
            proc.kill()

"""The machine's ceilings, measured at the start of a run, and the model's cost per token.

Two numbers bound any engine on this machine:
- memory read bandwidth (bytes/s): the best of several streaming probes (a multi-threaded
  copy and an in-place add counting read + write bytes, sums and a max over fp32, bf16
  and byte buffers, matrix-vector products, yun's native bf16 kernel when it is in use).
  The probes stream a buffer the size of the model's weights (clamped to [16 MiB,
  1 GiB]), so a model that fits in cache is measured against cache bandwidth, as it runs.
  On a shared machine the probes see what the other processes leave; so does the run.
- matmul FLOP/s: the best of model-shaped GEMMs ([512 x hidden] @ [hidden x inter],
  its down-projection, and [512 x 896] @ [896 x 4864]) in fp32 and bf16.
Taking the best of every probe keeps each ceiling an upper bound: a result above 100%
means a probe missed the machine's real peak, and the report says so.

From the checkpoint (safetensors headers, no weights loaded) we count the bytes a decode
step reads: every weight once, lm_head included; the embedding is a row lookup. MoE
experts count at top_k / num_experts. FLOPs per token are 2 x matmul parameters.

A phase's time floor is the larger of
    compute  2 x ((unique prompt tokens + output tokens - requests) x layer params
                  + output tokens x lm_head params) / FLOP/s
             (shared prefixes are computed once; a request's last token is never fed back;
             attention's own FLOPs are left out, which only raises the ceiling)
    memory   steps x weight bytes / bandwidth, with steps >= the longest output and
             >= output tokens / concurrency (each step reads every weight once)
and its ceiling in output tokens/s is output tokens / floor. Batch-1 decode's ceiling is
1 / max(weight bytes / bandwidth, 2 x params / FLOP/s).
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from yun.bench.workloads import BenchRequest, unique_prompt_tokens

MIB = 2**20
PROBE_MIN, PROBE_MAX = 16 * MIB, 1024 * MIB
CANONICAL_GEMM = (512, 896, 4864)  # [M x K] @ [K x N]: a Qwen2.5-0.5B up-projection
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_EMBED_NAMES = ("embed_tokens.", "wte.", "tok_embeddings.", "word_embeddings.")


# ---- the model's cost ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCost:
    """Parameters a token touches, from a checkpoint's tensor shapes."""

    dtype: str  # the dtype the weights run in
    bytes_per_param: int
    layer_params: int  # everything but the embedding and lm_head (MoE: active experts only)
    lm_head_params: int  # the output projection (the embedding matrix when tied)
    embedding_params: int
    hidden_size: int
    total_params: int  # as stored (tied matrices once, all experts)
    read_bytes_per_token: int | None = None  # quantized GGUF: the blocks' real bytes


    @property
    def matmul_params_per_token(self) -> int:
        return self.layer_params + self.lm_head_params

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes one decode step reads: every weight once, plus one embedding row."""
        if self.read_bytes_per_token is not None:
            return self.read_bytes_per_token
        return (self.matmul_params_per_token + self.hidden_size) * self.bytes_per_param

    def flops(self, computed_prompt_tokens: int, output_tokens: int, num_requests: int) -> float:
        fed = computed_prompt_tokens + output_tokens - num_requests
        return 2.0 * (max(fed, 0) * self.layer_params + output_tokens * self.lm_head_params)


def _safetensors_shapes(path: str) -> dict[str, tuple[list[int], str]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def model_cost(folder: str, dtype: str = "auto") -> ModelCost:
    """Count parameters from the checkpoint in `folder`; `dtype` as the engine's flag."""
    from yun.config import ModelConfig
    from yun.models.loader import checkpoint_files, resolve_dtype

    import torch

    cfg = ModelConfig.load(folder)
    run_dtype = resolve_dtype(cfg, dtype, torch.device("cpu"))
    if cfg.is_gguf:
        return _gguf_cost(cfg, str(run_dtype).removeprefix("torch."))
    shapes: dict[str, tuple[list[int], str]] = {}
    for f in checkpoint_files(folder):
        shapes.update(_safetensors_shapes(f))
    expert_share = _expert_share(cfg.hf)
    embed = lm_head = layers = total = 0
    for name, (shape, _) in shapes.items():
        n = math.prod(shape)
        total += n
        if any(e in name for e in _EMBED_NAMES):
            embed += n
        elif "lm_head" in name:
            lm_head += n
        elif ".experts." in name:
            layers += round(n * expert_share)
        else:
            layers += n
    if lm_head == 0:  # tied: the embedding matrix is the output projection
        lm_head = cfg.vocab_size * cfg.hidden_size
    return ModelCost(dtype=str(run_dtype).removeprefix("torch."),
                     bytes_per_param=torch.empty((), dtype=run_dtype).element_size(),
                     layer_params=layers, lm_head_params=lm_head, embedding_params=embed,
                     hidden_size=cfg.hidden_size, total_params=total)


def _gguf_cost(cfg: Any, run_dtype: str) -> ModelCost:
    """Parameters and the bytes a decode step reads, from a GGUF file's tensors (quantized
    tensors are read as stored; float ones in the dtype they run in)."""
    from yun.models.gguf_file import open_gguf

    gf = open_gguf(cfg.path)
    share = _expert_share(cfg.hf)
    run_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(run_dtype, 4)
    embed = lm_head = layers = total = read = 0
    for name, t in gf.tensors.items():
        n = int(t.n_elements)
        total += n
        stored = int(t.n_bytes) if t.tensor_type.name not in ("F32", "F16", "BF16") \
            else n * run_bytes
        if name == "token_embd.weight":
            embed += n
            read += stored // max(1, cfg.vocab_size)  # one row
            if cfg.tie_word_embeddings:
                lm_head += n
                read += stored
        elif name == "output.weight":
            lm_head += n
            read += stored
        elif "_exps." in name:
            layers += round(n * share)
            read += round(stored * share)
        else:
            layers += n
            read += stored
    return ModelCost(dtype=run_dtype, bytes_per_param=run_bytes, layer_params=layers,
                     lm_head_params=lm_head, embedding_params=embed,
                     hidden_size=cfg.hidden_size, total_params=total,
                     read_bytes_per_token=read)


def _expert_share(hf: dict[str, Any]) -> float:
    """Fraction of routed-expert weights one token uses (1.0 for dense models)."""
    top_k = hf.get("num_experts_per_tok")
    n = hf.get("num_experts") or hf.get("n_routed_experts") or hf.get("num_local_experts")
    return min(1.0, top_k / n) if top_k and n else 1.0


# ---- probes ----------------------------------------------------------------------------------
@dataclass
class Probe:
    name: str
    value: float  # GB/s or GFLOP/s
    unit: str
    detail: str = ""


def _best_times(ops: list[tuple[Callable[[], Any], int]], repeats: int) -> list[float]:
    """Best wall time of each (op, torch threads) over `repeats` interleaved rounds, after
    a warm-up round (page faults, thread pools, kernel selection). Interleaving spreads
    each op's tries over the whole probing time, so one busy moment on a shared machine
    does not decide a probe."""
    import torch

    saved = torch.get_num_threads()
    best = [math.inf] * len(ops)
    try:
        with torch.inference_mode():
            for round_ in range(repeats + 1):
                for i, (op, threads) in enumerate(ops):
                    torch.set_num_threads(threads)
                    t = time.perf_counter()
                    op()
                    if round_:
                        best[i] = min(best[i], time.perf_counter() - t)
    finally:
        torch.set_num_threads(saved)
    return best


def measure_bandwidth(nbytes: int, repeats: int = 5, native_bf16: bool = False) -> list[Probe]:
    """Streaming probes over an `nbytes` buffer, with torch's current thread count (and
    one thread for the copy and the sum: on a busy machine one thread can beat two)."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    src = torch.ones(nbytes // 4, dtype=torch.float32)  # [nbytes / 4]
    dst = torch.zeros_like(src)
    as_bf16 = src.view(torch.bfloat16)  # [nbytes / 2], the same bytes
    k = 4096
    w32 = src[: (src.numel() // k) * k].view(-1, k)  # [rows, 4096] weights for a GEMV
    w16 = as_bf16[: (as_bf16.numel() // k) * k].view(-1, k)
    x32, x16 = torch.ones(1, k), torch.ones(1, k, dtype=torch.bfloat16)  # [1, 4096]
    mib = f"{nbytes / MIB:.0f} MiB"
    # name: (op, bytes moved, threads, detail)
    probes = {
        "copy fp32 (read+write)": (lambda: dst.copy_(src), 2 * nbytes, threads, f"2 x {mib}"),
        "add in place fp32 (read+write)": (lambda: dst.add_(1.0), 2 * nbytes, threads, mib),
        "sum fp32": (lambda: src.sum(), nbytes, threads, mib),
        "max uint8": (lambda: src.view(torch.uint8).max(), nbytes, threads, mib),
        "sum bf16": (lambda: as_bf16.sum(), nbytes, threads, mib),
        "gemv fp32 (F.linear)": (lambda: F.linear(x32, w32), w32.numel() * 4, threads, mib),
        "gemv bf16 (F.linear)": (lambda: F.linear(x16, w16), w16.numel() * 2, threads, mib),
    }
    if threads > 1:
        probes["copy fp32 (read+write), 1 thread"] = (lambda: dst.copy_(src), 2 * nbytes, 1,
                                                      f"2 x {mib}")
        probes["sum fp32, 1 thread"] = (lambda: src.sum(), nbytes, 1, mib)
    if native_bf16:
        from yun import kernels

        fn = kernels.bf16_gemv()
        if fn is not None:
            probes["gemv bf16 (yun native)"] = (lambda: fn(x16, w16, None), w16.numel() * 2,
                                                threads, mib)
    times = _best_times([(op, n) for op, _, n, _ in probes.values()], repeats)
    return [Probe(name, moved / t / 1e9, "GB/s", detail)
            for (name, (_, moved, _, detail)), t in zip(probes.items(), times)]


def gemm_shapes(hidden: int, intermediate: int) -> list[tuple[int, int, int]]:
    shapes = [(512, hidden, intermediate), (512, intermediate, hidden), CANONICAL_GEMM]
    return list(dict.fromkeys(shapes))


def measure_matmul(shapes: list[tuple[int, int, int]], repeats: int = 3,
                   dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[Probe]:
    import torch

    threads = torch.get_num_threads()
    cases, ops = [], []
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        for m, k, n in shapes:
            a = torch.randn(m, k).to(dt)  # [M, K]
            b = torch.randn(k, n).to(dt)  # [K, N]
            cases.append((dt_name, m, k, n))
            ops.append((lambda a=a, b=b: a @ b, threads))
    times = _best_times(ops, repeats)
    return [Probe(f"matmul {dt}", 2.0 * m * k * n / t / 1e9, "GFLOP/s",
                  f"[{m} x {k}] @ [{k} x {n}]") for (dt, m, k, n), t in zip(cases, times)]


# ---- ceilings --------------------------------------------------------------------------------
@dataclass
class Roofline:
    bandwidth: float  # bytes/s, the best probe
    flops: float  # FLOP/s, the best probe
    cost: ModelCost
    threads: int
    probes: list[Probe] = field(default_factory=list)

    @property
    def decode_ceiling(self) -> float:
        """Batch-1 decode, tokens/s."""
        c = self.cost
        return 1.0 / max(c.weight_bytes_per_token / self.bandwidth,
                         2.0 * c.matmul_params_per_token / self.flops)

    def floor(self, requests: list[BenchRequest], concurrency: int | None = None
              ) -> dict[str, float]:
        """Lower bounds on the seconds a phase takes (see the module docstring)."""
        outputs = [r.max_tokens for r in requests]
        total = sum(outputs)
        flops = self.cost.flops(unique_prompt_tokens(requests), total, len(requests))
        width = min(concurrency or len(requests), len(requests))
        steps = max(max(outputs, default=0), math.ceil(total / max(width, 1)))
        compute = flops / self.flops
        memory = steps * self.cost.weight_bytes_per_token / self.bandwidth
        return {"compute_floor_s": compute, "memory_floor_s": memory,
                "floor_s": max(compute, memory)}

    def ceiling(self, requests: list[BenchRequest], concurrency: int | None = None) -> float:
        """Output tokens/s no engine can beat on this phase."""
        floor = self.floor(requests, concurrency)["floor_s"]
        return sum(r.max_tokens for r in requests) / floor if floor > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        c = self.cost
        return {"bandwidth_gb_s": self.bandwidth / 1e9, "matmul_gflop_s": self.flops / 1e9,
                "threads": self.threads, "probes": [asdict(p) for p in self.probes],
                "model": {**asdict(c), "weight_bytes_per_token": c.weight_bytes_per_token,
                          "matmul_params_per_token": c.matmul_params_per_token},
                "decode_ceiling_tokens_per_s": self.decode_ceiling}


def measure_roofline(folder: str, dtype: str = "auto", threads: int | None = None,
                     probe_bytes: int | None = None, native_kernels: bool = True,
                     repeats: int = 5) -> Roofline:
    """Probe the machine with `threads` torch threads (default: one per core) and cost
    the checkpoint in `folder`."""
    import torch

    from yun.config import ModelConfig
    from yun.engine.device import default_threads

    cost = model_cost(folder, dtype)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    if probe_bytes is None:
        probe_bytes = min(max(cost.weight_bytes_per_token, PROBE_MIN), PROBE_MAX)
    native = native_kernels and cost.dtype == "bfloat16" and _native_ok()
    bw = measure_bandwidth(probe_bytes, repeats, native_bf16=native)
    cfg = ModelConfig.load(folder)
    mm = measure_matmul(gemm_shapes(cfg.hidden_size, cfg.intermediate_size),
                        repeats=max(2, repeats - 2))
    return Roofline(bandwidth=max(p.value for p in bw) * 1e9,
                    flops=max(p.value for p in mm) * 1e9, cost=cost, threads=threads,
                    probes=bw + mm)


def _native_ok() -> bool:
    from yun import kernels

    return kernels.native_isa() is not None  # an AVX-512 or AVX2 build runs here


def attach_ceiling(result: Any, roofline: Roofline, requests: list[BenchRequest],
                   concurrency: int | None = None) -> None:
    """Add the phase's ceilings and the result's fractions of them to `result.extra`
    (`result` is a metrics.RunResult; for `single`, decode speed too)."""
    floor = roofline.floor(requests, concurrency)
    ceiling = roofline.ceiling(requests, concurrency)
    result.extra.update(floor)
    result.extra["ceiling_tokens_per_s"] = ceiling
    result.extra["fraction_of_ceiling"] = result.output_tokens_per_s / ceiling
    decode = result.extra.get("decode_tokens_per_s")
    if decode is not None:
        result.extra["decode_ceiling_tokens_per_s"] = roofline.decode_ceiling
        result.extra["decode_fraction_of_ceiling"] = decode / roofline.decode_ceiling

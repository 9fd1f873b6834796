"""The model runner: owns the model and the KV-cache tensors; turns a scheduled batch
into flat tensors (token ids, positions, slot mapping, block tables), runs the model
once, and samples.

Shapes: T = tokens this step, B_d = decode rows, N = rows whose logits are computed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from yun.config import EngineConfig, ModelConfig
from yun.engine.request import Request
from yun.engine.sampler import Sampler, SamplingRow, logprobs_for
from yun.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from yun.layers.attention import set_decode_backend
from yun.layers.fused import set_fused_backend
from yun.layers.linear import set_bf16_backend
from yun.layers.quant_linear import QuantWeight
from yun.layers.quantized import set_quant_backend
from yun.layers.context import AttentionMetadata, ForwardContext, PrefillSeq, forward_context
from yun.models.huge_pages import place_in_huge_pages
from yun.models.loader import load_model, resolve_dtype
from yun.models.weight_stats import weight_summary
from yun.outputs import PositionLogprobs

if TYPE_CHECKING:
    from yun.distributed.parallel import TensorParallel

PROMPT_LOGPROB_ROWS = 256  # logits rows per pass when scoring prompts (bounds memory)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2**30
    return int(min(avail * 0.25, 4 * 2**30))


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    order: list[ScheduledRequest]  # sequences in batch order (decodes first)
    q_starts: list[int]  # first row of each sequence


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig,
                 tp: "TensorParallel | None" = None):
        self.model_config = model_config
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or default_threads())
        self.dtype = resolve_dtype(model_config, config.dtype, self.device)
        if config.quantization and config.dtype == "auto" and self.device.type == "cpu":
            self.dtype = torch.float32  # as for quantized GGUF files: activations in fp32
        self.model = load_model(model_config, self.dtype, self.device, config.quantization)
        self.tp = tp  # tensor parallelism: this rank keeps its shard of every weight
        if tp is not None:
            from yun.distributed.tp import shard_model

            shard_model(self.model, tp)
        if self.device.type == "cpu":
            place_in_huge_pages(self.model)
        set_bf16_backend(self._bf16_kernels())
        set_decode_backend(self._decode_kernel())
        set_fused_backend(self._fused_ops())
        self.has_quantized_weights = any(isinstance(m, QuantWeight) for m in self.model.modules())
        set_quant_backend(self._quant_kernels())
        if tp is None or tp.rank == 0:
            print(f"yun: {self.describe()}", file=sys.stderr, flush=True)
        self.block_size = config.block_size
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    @property
    def _isa(self) -> str | None:
        """The native kernel build asked for (None: the best this CPU runs)."""
        return None if self.config.kernel_isa == "auto" else self.config.kernel_isa

    def _bf16_kernels(self):
        if not (self.config.native_kernels and self.device.type == "cpu"
                and self.dtype == torch.bfloat16):
            return None
        from yun import kernels

        few, many = kernels.bf16_gemv(self._isa), kernels.bf16_gemm(self._isa)
        return None if few is None or many is None else (few, many)

    def describe(self) -> str:
        """The start-up line: the CPU, its features, and the kernels this model runs on."""
        from yun.layers.attention import decode_backend_name
        from yun.layers.linear import bf16_backend_name
        from yun.layers.quantized import quant_backend_name

        from yun.kernels import native_isa
        from yun.kernels.cpu import describe

        weights = weight_summary(self.model)
        if self.device.type != "cpu":
            return f"{self.device}: torch kernels; weights {weights}"
        quant = quant_backend_name() if self.has_quantized_weights else "-"
        build = native_isa(isa=self._isa) if self.config.native_kernels else None
        kernels = (f"native build: {build or 'none'}, bf16 matmul: {bf16_backend_name()}, "
                   f"decode attention: {decode_backend_name()}")
        return f"{describe(quant)}; {kernels}; weights {weights}"

    def _quant_kernels(self):
        """The native quantized matmuls, built only for a model with quantized weights."""
        if not (self.config.native_kernels and self.device.type == "cpu"
                and self.has_quantized_weights):
            return None
        from yun import kernels

        return kernels.quant()

    def _fused_ops(self):
        if not (self.config.native_kernels and self.device.type == "cpu"):
            return None
        from yun import kernels

        return kernels.elementwise(self._isa)

    def _decode_kernel(self):
        if not (self.config.native_kernels and self.device.type == "cpu"):
            return None
        from yun import kernels

        return kernels.paged_decode_attention(self._isa)

    # ---- KV cache --------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        shape = self.model.kv_cache_shape(1, 1)
        per_layer = int(np.prod(shape))
        elem = torch.empty((), dtype=self.dtype).element_size()
        return per_layer * elem * self.model_config.num_layers

    def allocate_kv_cache(self, memory_bytes: int | None) -> int:
        """Allocate per-layer cache tensors; returns the number of blocks."""
        budget = memory_bytes or default_kv_cache_bytes(self.device)
        per_block = self.kv_bytes_per_token() * self.block_size
        self.num_blocks = budget // per_block
        if self.tp is not None:  # every rank must hold the same blocks
            self.num_blocks = self.tp.min_over_ranks(self.num_blocks)
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds no block of "
                             f"{self.block_size} tokens ({per_block} bytes per block)")
        shape = self.model.kv_cache_shape(self.num_blocks, self.block_size)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.model_config.num_layers)]
        return self.num_blocks

    # ---- one step --------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        if all(s.num_new_tokens == 1 for s in sched.scheduled):
            return self._prepare_decodes(sched.scheduled)
        order = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first
        bs = self.block_size
        ids: list[int] = []
        pos_chunks: list[np.ndarray] = []
        slot_chunks: list[np.ndarray] = []
        q_starts: list[int] = []
        prefills: list[PrefillSeq] = []
        nd = sum(1 for s in order if s.num_new_tokens == 1)
        max_blocks = max((len(s.request.block_ids) for s in order[:nd]), default=0)
        dec_tables = np.zeros((nd, max_blocks), dtype=np.int64)
        dec_lens = np.zeros(nd, dtype=np.int64)
        for i, s in enumerate(order):
            req, start, n = s.request, s.start, s.num_new_tokens
            q_starts.append(len(ids))
            ids.extend(req.token_ids_slice(start, start + n))
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(req.block_ids, dtype=np.int64)
            pos_chunks.append(pos)
            slot_chunks.append(table[pos // bs] * bs + pos % bs)
            if i < nd:
                dec_tables[i, :len(table)] = table
                dec_lens[i] = start + 1
            else:
                nblk = -(-(start + n) // bs)
                prefills.append(PrefillSeq(q_starts[-1], n, start + n,
                                           torch.from_numpy(table[:nblk]).to(self.device)))
        dev = self.device
        decode_mask = None
        if nd:
            span = np.arange(max_blocks * bs)
            decode_mask = torch.from_numpy(span[None, :] < dec_lens[:, None]).to(dev)
            decode_mask = decode_mask[:, None, None, :]  # [B_d, 1, 1, L]
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(dev),
            num_decodes=nd,
            decode_block_tables=torch.from_numpy(dec_tables).to(dev) if nd else None,
            decode_context_lens=torch.from_numpy(dec_lens).to(dev) if nd else None,
            decode_mask=decode_mask,
            prefills=prefills,
        )
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.from_numpy(np.concatenate(pos_chunks)).to(dev),
                          attn, order, q_starts)

    def _prepare_decodes(self, order: list[ScheduledRequest]) -> StepInputs:
        """`prepare` for a step of decodes only (one token per sequence, the common step):
        the same tensors from plain lists, without the per-sequence numpy arrays."""
        bs, dev = self.block_size, self.device
        pos = [s.start for s in order]  # [B_d]
        tables = [s.request.block_ids for s in order]
        width = max(len(t) for t in tables)
        padded = [t if len(t) == width else t + [0] * (width - len(t)) for t in tables]
        block_tables = torch.tensor(padded, dtype=torch.long, device=dev)  # [B_d, max_blocks]
        lens = torch.tensor([p + 1 for p in pos], dtype=torch.long, device=dev)  # [B_d]
        span = torch.arange(width * bs, device=dev)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, pos)],
                                      dtype=torch.long, device=dev),
            num_decodes=len(order),
            decode_block_tables=block_tables,
            decode_context_lens=lens,
            decode_mask=(span[None, :] < lens[:, None])[:, None, None, :],  # [B_d, 1, 1, L]
        )
        ids = [s.request.token_ids_slice(p, p + 1)[0] for s, p in zip(order, pos)]
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(pos, dtype=torch.long, device=dev),
                          attn, list(order), list(range(len(order))))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        if sched.is_empty:
            return out
        inp = self.prepare(sched)
        sample_idx = [i for i, s in enumerate(inp.order) if s.samples]
        rows = torch.tensor([inp.q_starts[i] + inp.order[i].num_new_tokens - 1
                             for i in sample_idx], device=self.device) if sample_idx else None
        if self.tp is not None:  # the other ranks run the same forward and logits rows
            self.tp.send_step(inp, rows)
        hidden = self.run_model(inp)  # [T, E]
        if sample_idx:
            # Every row samples (a step of decodes): the rows are all of `hidden`, in order.
            last = hidden if len(sample_idx) == hidden.shape[0] else hidden[rows]
            logits = self.model.compute_logits(last)  # [N, V]
            reqs = [inp.order[i].request for i in sample_idx]
            tokens, lps = self.sampler(logits, [self._sampling_row(r) for r in reqs])
            for req, tok, lp in zip(reqs, tokens, lps):
                out.sampled[req.request_id] = tok
                if lp is not None:
                    out.logprobs[req.request_id] = lp
        for i, s in enumerate(inp.order):
            if s.request.wants_prompt_logprobs:
                lps = self._prompt_logprobs(s, hidden, inp.q_starts[i])
                out.prompt_logprobs[s.request.request_id] = lps
        return out

    def run_model(self, inp: StepInputs) -> torch.Tensor:
        """The forward pass over the flat batch -> hidden states [T, E] (tensor-parallel
        workers call it too, with the inputs rank 0 sent)."""
        with forward_context(ForwardContext(inp.attn, self.kv_caches)):
            return self.model(inp.input_ids, inp.positions)

    def _sampling_row(self, req: Request) -> SamplingRow:
        gen = None
        if not req.params.greedy:
            gen = self.generators.get(req.request_id)
            if gen is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(req.seed)
                self.generators[req.request_id] = gen
        return SamplingRow(req.params, gen, req.prompt_token_ids, req.output_token_ids,
                           req.grammar)

    def _prompt_logprobs(self, s: ScheduledRequest, hidden: torch.Tensor,
                         q_start: int) -> list[PositionLogprobs | None]:
        """Logprobs of prompt tokens start+1 .. end of this chunk (row j predicts j+1).

        Position 0 has none (None). Positions already scored before a preemption are skipped.
        """
        req = s.request
        P = req.num_prompt_tokens
        done = len(req.prompt_logprobs)
        result: list[PositionLogprobs | None] = []
        if s.start == 0 and done == 0:
            result.append(None)
            done = 1
        # Target positions j in [max(done, start+1), min(start+n, P-1)] use row j-1.
        first = max(done, s.start + 1)
        last = min(s.start + s.num_new_tokens, P - 1)
        n_top = req.params.prompt_logprobs or 0
        for j0 in range(first, last + 1, PROMPT_LOGPROB_ROWS):
            j1 = min(j0 + PROMPT_LOGPROB_ROWS, last + 1)
            rows = torch.arange(j0 - 1, j1 - 1, device=self.device) - s.start + q_start
            if self.tp is not None:
                self.tp.send_logits_rows(rows)
            raw = self.model.compute_logits(hidden[rows]).log_softmax(-1)  # [n, V]
            result.extend(logprobs_for(raw, req.prompt_token_ids[j0:j1], n_top))
        return result

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

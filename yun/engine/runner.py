"""The model runner: owns the model and the KV-cache tensors; turns a scheduled batch
into flat tensors (token ids, positions, slot mapping, block tables), runs the model
once, and samples.

Shapes: T = tokens this step, B_d = decode rows, N = rows whose logits are computed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from yun.config import EngineConfig, ModelConfig
from yun.engine.device import default_kv_cache_bytes, default_threads, resolve_device
from yun.engine.request import Request
from yun.engine.sampler import Sampler, SamplingRow, logprobs_for
from yun.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from yun.engine.spec.verify import accepted_prefix, seed_for_position
from yun.layers.backend import Backend, QuantKernels, use_backend
from yun.layers.kv_quant import FP8, SCALE_BYTES
from yun.layers.quant_linear import QuantWeight
from yun.layers.context import AttentionMetadata, ForwardContext, PrefillSeq, forward_context
from yun.models.huge_pages import place_in_huge_pages
from yun.models.loader import load_model, resolve_dtype
from yun.models.weight_stats import weight_summary
from yun.outputs import PositionLogprobs

if TYPE_CHECKING:
    from yun.distributed.parallel import TensorParallel
    from yun.engine.pooling import PoolingConfig

PROMPT_LOGPROB_ROWS = 256  # logits rows per pass when scoring prompts (bounds memory)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    order: list[ScheduledRequest]  # sequences in batch order (decodes first)
    q_starts: list[int]  # first row of each sequence


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig,
                 tp: "TensorParallel | None" = None, role: str = "target"):
        """`role`: "target" (the served model) sets torch's thread count; "draft" (a
        speculative draft model in the same process, built after the target) keeps the
        target's. Each runner holds its own kernel choices (`self.backend`) and runs its
        forward passes inside them (`use_backend`), so neither takes the other's."""
        self.model_config = model_config
        self.role = role
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and role == "target":  # a draft keeps the target's
            torch.set_num_threads(config.num_threads or default_threads())
        self.dtype = resolve_dtype(model_config, config.dtype, self.device)
        if config.quantization and config.dtype == "auto" and self.device.type == "cpu":
            self.dtype = torch.float32  # as for quantized GGUF files: activations in fp32
        self.tp = tp  # tensor parallelism: this rank reads only its shard of each weight
        shard = None
        if tp is not None:
            from yun.distributed.tp import shard_model

            shard = partial(shard_model, tp=tp)
        self.model = load_model(model_config, self.dtype, self.device, config.quantization,
                                shard=shard)
        if self.device.type == "cpu":
            place_in_huge_pages(self.model)
        self.has_quantized_weights = any(isinstance(m, QuantWeight) for m in self.model.modules())
        # This runner's kernel choices, built once: every forward pass and logits
        # computation runs inside `use_backend(self.backend)`; nothing is installed in a
        # module, so another engine in the process (a draft, a test's second LLM) keeps its own.
        self.backend = self.choose_backend()
        if tp is None or tp.rank == 0:
            label = "" if role == "target" else f"{role} model: "
            print(f"yun: {label}{self.describe()}", file=sys.stderr, flush=True)
        self.block_size = config.block_size
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        # Two KV-cache groups when only some layers slide (yun/engine/kv_groups.py): the
        # sliding layers, their widest window and their pool's blocks (num_blocks is then
        # the full group's). Empty / None / 0 for every other model.
        self.sliding_layers, self.group_window = self._kv_groups()
        self.num_window_blocks = 0
        # Speculative decoding with an MTP head reads the target's final hidden states:
        # with `keep_hidden`, each step's [T, E] tensor and layout stay here (no copy).
        self.keep_hidden = False
        self.last_hidden: tuple[torch.Tensor, StepInputs] | None = None

    @property
    def _isa(self) -> str | None:
        """The native kernel build asked for (None: the best this CPU runs)."""
        return None if self.config.kernel_isa == "auto" else self.config.kernel_isa

    def choose_backend(self) -> Backend:
        """The kernels this runner's model runs on (pure torch off CPU or without
        native_kernels)."""
        quant = self._quant_kernels()
        if quant is not None:
            from yun import kernels

            quant = QuantKernels.choose(
                quant, many_rows=kernels.quant_many_rows(self._isa),
                many_rows_from=kernels.quant_many_rows_from(isa=self._isa),
                many_rows_dtype=kernels.quant_many_rows_dtype(isa=self._isa))
        return Backend(bf16=self._bf16_kernels(), f32=self._f32_kernel(),
                       decode=self._decode_kernel(), fused=self._fused_ops(), quant=quant)

    def _bf16_kernels(self):
        if not (self.config.native_kernels and self.device.type == "cpu"
                and self.dtype == torch.bfloat16):
            return None
        from yun import kernels

        few, many = kernels.bf16_gemv(self._isa), kernels.bf16_gemm(self._isa)
        if few is None or many is None:
            return None
        return few, kernels.bf16_many_rows(many)

    def _f32_kernel(self):
        """The native fp32-weight GEMV for decode rows (torch's streams at ~40% of the
        read bandwidth), for any model on CPU: fp32 weights appear in bf16 models too
        (a GGUF's F32 tensors)."""
        if not (self.config.native_kernels and self.device.type == "cpu"):
            return None
        from yun import kernels

        return kernels.f32_gemv(self._isa)

    def describe(self) -> str:
        """The start-up line: the CPU, its features, and the kernels this model runs on."""
        from yun.kernels import native_isa
        from yun.kernels.cpu import describe

        weights = weight_summary(self.model)
        if self.device.type != "cpu":
            return f"{self.device}: torch kernels; weights {weights}"
        quant = self.backend.quant_name if self.has_quantized_weights else "-"
        build = native_isa(isa=self._isa) if self.config.native_kernels else None
        kernels = (f"native build: {build or 'none'}, bf16 matmul: {self.backend.bf16_name}, "
                   f"fp32 decode matmul: {self.backend.f32_name}, "
                   f"decode attention: {self.backend.decode_name}")
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
    def _kv_groups(self) -> tuple[tuple[int, ...], int | None]:
        """(the sliding layers, their widest window) when the model mixes sliding and
        full-attention layers, else ((), None): one group, as before."""
        if self.is_encoder:
            return (), None
        cfg = self.model_config
        windows = cfg.layer_windows()
        sliding = tuple(i for i, w in enumerate(windows) if w is not None)
        if not sliding or len(sliding) == len(windows):
            return (), None
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None or tuple(getattr(layer.self_attn, "window", None)
                                   for layer in layers) != windows:
            raise ValueError(f"{cfg.architecture} mixes sliding-window and full-attention "
                             "layers, which yun runs only for the Llama-family attention "
                             "(Qwen2, Qwen3)")
        return sliding, max(windows[i] for i in sliding)

    def _window_blocks_bound(self) -> int:
        """The most blocks the sliding group can hold at once: each running request keeps
        the blocks of its last W positions (at most ceil(W / bs) + 1) and, within a step,
        those of its new tokens (at most ceil(n / bs) + 1; the n add up to the step budget)."""
        bs, cfg = self.block_size, self.config
        batched = cfg.max_num_batched_tokens or (512 if self.device.type == "cpu" else 8192)
        if not cfg.enable_chunked_prefill:  # a whole prompt in one step
            batched = max(batched, cfg.max_model_len or self.model_config.max_context_len)
        return (cfg.max_num_seqs * (-(-self.group_window // bs) + 2)
                + -(-batched // bs))

    def kv_cache_spec(self, num_blocks: int) -> tuple[tuple[int, ...], torch.dtype]:
        """One layer's cache shape and dtype: the model's spec, with an fp8 cache that
        shape in float8 e4m3, with an int8 cache (yun/layers/kv_quant.py) its rows widened
        by their float32 scale."""
        shape = self.model.kv_cache_shape(num_blocks, self.config.block_size)
        if self.config.kv_cache_dtype == "auto":
            return shape, self.dtype
        if len(shape) != 5:
            raise ValueError(f"kv_cache_dtype={self.config.kv_cache_dtype!r} is not supported "
                             f"for {self.model_config.architecture} (its cache holds "
                             "compressed latents, not per-head keys and values); use auto")
        if self.config.kv_cache_dtype == "fp8":
            return shape, FP8
        if shape[-1] % SCALE_BYTES:
            raise ValueError(f"kv_cache_dtype='int8' needs a head_dim divisible by "
                             f"{SCALE_BYTES}, got {shape[-1]}")
        return (*shape[:-1], shape[-1] + SCALE_BYTES), torch.int8

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over all layers."""
        shape, dtype = self.kv_cache_spec(1)
        per_layer = int(np.prod(shape)) // self.config.block_size
        elem = torch.empty((), dtype=dtype).element_size()
        return per_layer * elem * self.model_config.num_layers

    @property
    def is_encoder(self) -> bool:
        """An encoder (BertModel): no KV cache, embeddings only."""
        return bool(getattr(self.model, "is_encoder", False))

    def allocate_kv_cache(self, memory_bytes: int | None) -> int:
        """Allocate per-layer cache tensors; returns the number of blocks. An encoder has
        none: the blocks returned only bound how many tokens the scheduler admits."""
        if self.is_encoder:
            per_seq = -(-self.model_config.max_position_embeddings // self.block_size)
            self.num_blocks = per_seq * self.config.max_num_seqs
            return self.num_blocks
        budget = memory_bytes or default_kv_cache_bytes(self.device)
        per_block = self.kv_bytes_per_token() * self.block_size
        self.num_blocks = budget // per_block
        if self.sliding_layers:  # two groups: the sliding pool first, the rest full
            self.num_blocks, self.num_window_blocks = self._split_kv_budget(budget)
        if self.tp is not None:  # every rank must hold the same blocks
            self.num_blocks = self.tp.min_over_ranks(self.num_blocks)
            if self.sliding_layers:
                self.num_window_blocks = self.tp.min_over_ranks(self.num_window_blocks)
        if self.num_blocks < 1 or (self.sliding_layers and self.num_window_blocks < 1):
            raise ValueError(f"kv_cache_memory={budget} bytes holds no block of "
                             f"{self.block_size} tokens ({per_block} bytes per block)")
        shape, dtype = self.kv_cache_spec(self.num_blocks)
        if self.sliding_layers:
            window_shape, _ = self.kv_cache_spec(self.num_window_blocks)
            self.kv_caches = [
                torch.zeros(window_shape if i in self.sliding_layers else shape,
                            dtype=dtype, device=self.device)
                for i in range(self.model_config.num_layers)]
        else:
            self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device)
                              for _ in range(self.model_config.num_layers)]
        if self.tp is None or self.tp.rank == 0:
            print(f"yun: {self.describe_kv_cache()}", file=sys.stderr, flush=True)
        return self.num_blocks

    def _split_kv_budget(self, budget: int) -> tuple[int, int]:
        """(full-group blocks, sliding-group blocks) for `budget` bytes: the sliding pool
        gets what its windows can hold (`_window_blocks_bound`), never more blocks than
        an even split would give every layer; the full-attention layers get the rest."""
        layer_block = self.kv_bytes_per_token() // self.model_config.num_layers \
            * self.block_size  # one layer's bytes for one block
        n_sliding = len(self.sliding_layers)
        n_full = self.model_config.num_layers - n_sliding
        even = budget // (layer_block * self.model_config.num_layers)
        window_blocks = min(self._window_blocks_bound(), even)
        return (budget - window_blocks * layer_block * n_sliding) // (layer_block * n_full), \
            window_blocks

    def describe_kv_cache(self) -> str:
        """The start-up line on the KV cache: its element type, bytes per token, and how
        many tokens fit."""
        kind = {"int8": "int8 + float32 scale per token and head",
                "fp8": "fp8 (float8_e4m3fn, no scale)"}.get(
                    self.config.kv_cache_dtype, str(self.dtype).removeprefix("torch."))
        per_token = self.kv_bytes_per_token()
        if self.sliding_layers:
            layers = self.model_config.num_layers
            per_layer = per_token // layers * self.block_size  # one layer, one block
            n_sliding = len(self.sliding_layers)
            full_mib = per_layer * (layers - n_sliding) * self.num_blocks / 2**20
            window_mib = per_layer * n_sliding * self.num_window_blocks / 2**20
            return (f"KV cache: {kind}, {per_token} bytes per token, two groups: "
                    f"{layers - n_sliding} full-attention layers {self.num_blocks} blocks of "
                    f"{self.block_size} = {self.num_blocks * self.block_size} tokens fit "
                    f"({full_mib:.1f} MiB); {n_sliding} sliding layers (window "
                    f"{self.group_window}) {self.num_window_blocks} blocks "
                    f"({window_mib:.1f} MiB)")
        total = per_token * self.num_blocks * self.block_size
        return (f"KV cache: {kind}, {per_token} bytes per token, {self.num_blocks} blocks of "
                f"{self.block_size} = {self.num_blocks * self.block_size} tokens fit "
                f"({total / 2**20:.1f} MiB)")

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
            k = len(s.draft_token_ids)  # proposals to verify come after the known tokens
            ids.extend(req.token_ids_slice(start, start + n - k))
            ids.extend(s.draft_token_ids)
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
        if self.sliding_layers:
            attn.sliding = self._sliding_view(attn, order)
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
        if self.sliding_layers:
            attn.sliding = self._sliding_view(attn, order)
        ids = [s.request.token_ids_slice(p, p + 1)[0] for s, p in zip(order, pos)]
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(pos, dtype=torch.long, device=dev),
                          attn, list(order), list(range(len(order))))

    def _sliding_view(self, attn: AttentionMetadata,
                      order: list[ScheduledRequest]) -> AttentionMetadata:
        """The sliding group's metadata for the batch `attn` describes: the same rows,
        lengths and masks over `req.window_block_ids` (FREED entries before each window
        are never read: masked, or skipped by the native kernel)."""
        bs, dev, nd = self.block_size, self.device, attn.num_decodes
        slots: list[np.ndarray] = []
        tables: list[list[int]] = []
        prefills: list[PrefillSeq] = []
        for i, s in enumerate(order):
            table = np.asarray(s.request.window_block_ids, dtype=np.int64)
            pos = np.arange(s.start, s.start + s.num_new_tokens, dtype=np.int64)
            slots.append(table[pos // bs] * bs + pos % bs)
            if i < nd:
                tables.append(s.request.window_block_ids)
            else:
                p = attn.prefills[i - nd]
                nblk = -(-p.ctx_len // bs)
                prefills.append(replace(p, block_table=torch.from_numpy(table[:nblk]).to(dev)))
        dec_tables = None
        if nd:  # as wide as the full group's: one entry per block of positions in both
            width = attn.decode_block_tables.shape[1]
            dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                      dtype=torch.long, device=dev)
        return replace(attn, slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
                       decode_block_tables=dec_tables, prefills=prefills)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        with use_backend(self.backend):  # the logits and prompt logprobs too
            return self._execute(sched)

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        if sched.is_empty:
            return out
        inp = self.prepare(sched)
        sampling = [(i, inp.order[i]) for i in range(len(inp.order)) if inp.order[i].samples]
        row_ids: list[int] = []  # logits rows: the last token, or with k proposals the last k+1
        for i, s in sampling:
            end = inp.q_starts[i] + s.num_new_tokens
            row_ids.extend(range(end - len(s.draft_token_ids) - 1, end))
        rows = torch.tensor(row_ids, device=self.device) if row_ids else None
        if self.tp is not None:  # the other ranks run the same forward and logits rows
            self.tp.send_step(inp, rows)
        hidden = self.run_model(inp)  # [T, E]
        if self.keep_hidden:
            self.last_hidden = (hidden, inp)
        if sampling:
            # Every row samples (a step of decodes): the rows are all of `hidden`, in order.
            last = hidden if len(row_ids) == hidden.shape[0] else hidden[rows]
            logits = self.model.compute_logits(last)  # [N, V]
            srows = [r for _, s in sampling for r in self._sampling_rows(s)]
            tokens, lps = self.sampler(logits, srows)
            at = 0
            for _, s in sampling:
                k = len(s.draft_token_ids)
                mine = tokens[at:at + k + 1]
                kept = accepted_prefix(s.draft_token_ids, mine) if k else mine
                rid = s.request.request_id
                out.sampled[rid] = kept
                if lps[at] is not None:
                    out.logprobs[rid] = lps[at:at + len(kept)]
                at += k + 1
        for i, s in enumerate(inp.order):
            if s.request.wants_prompt_logprobs:
                lps = self._prompt_logprobs(s, hidden, inp.q_starts[i])
                out.prompt_logprobs[s.request.request_id] = lps
        return out

    def run_model(self, inp: StepInputs) -> torch.Tensor:
        """The forward pass over the flat batch -> hidden states [T, E] (tensor-parallel
        workers call it too, with the inputs rank 0 sent)."""
        with use_backend(self.backend), forward_context(ForwardContext(inp.attn,
                                                                       self.kv_caches)):
            return self.model(inp.input_ids, inp.positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head over hidden [N, E] -> [N, V], on this runner's kernels."""
        with use_backend(self.backend):
            return self.model.compute_logits(hidden)

    def _sampling_rows(self, s: ScheduledRequest) -> list[SamplingRow]:
        """One row per token sampled for the request: the next one, or with proposals one
        per verified position (row j sees the proposals before it as output so far)."""
        req, draft = s.request, s.draft_token_ids
        if not draft:
            return [self._sampling_row(req, req.output_token_ids)]
        masks = None
        if req.grammar is not None:
            masks = req.grammar.masks_along(draft, self.model_config.vocab_size)
        return [self._sampling_row(req, req.output_token_ids + draft[:j],
                                   None if masks is None else masks[j])
                for j in range(len(draft) + 1)]

    def _sampling_row(self, req: Request, output: list[int],
                      grammar_mask: torch.Tensor | None = None) -> SamplingRow:
        gen = None
        if not req.params.greedy:  # the noise of this output position (see spec/verify.py)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed_for_position(req.seed, len(output)))
        return SamplingRow(req.params, gen, req.prompt_token_ids, output, req.grammar,
                           grammar_mask)

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

    @torch.inference_mode()
    def embed(self, sched: SchedulerOutput, pooling: "PoolingConfig") -> list[list[float]]:
        """One forward over whole prompts (no sampling; a decoder's K/V go to the blocks
        the caller lent and are dropped after) -> one pooled vector per request."""
        with use_backend(self.backend):
            return self._embed(sched, pooling)

    def _embed(self, sched: SchedulerOutput, pooling: "PoolingConfig") -> list[list[float]]:
        if self.is_encoder:
            hidden = self._encode([s.request.prompt_token_ids for s in sched.scheduled])
        else:
            inp = self.prepare(sched)
            flat = self.run_model(inp)  # [T, E]
            hidden = [flat[inp.q_starts[i]:inp.q_starts[i] + s.num_new_tokens]
                      for i, s in enumerate(inp.order)]
            order = {id(s): i for i, s in enumerate(inp.order)}
            hidden = [hidden[order[id(s)]] for s in sched.scheduled]
        vectors = torch.stack([_pool(h, pooling.mode) for h in hidden]).float()  # [B, E]
        if pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.tolist()

    def _encode(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """An encoder over a padded batch -> each prompt's hidden states [n, E]."""
        L = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        out = self.model.encode(ids.to(self.device), mask.to(self.device))  # [B, L, E]
        return [out[i, :len(p)] for i, p in enumerate(prompts)]

    def release(self, request_id: str) -> None:
        """Forget a finished request (the runner keeps no per-request state today)."""


def _pool(hidden: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden: [n, E] of one sequence -> [E]."""
    if mode == "mean":
        return hidden.float().mean(0)
    if mode == "cls":
        return hidden[0].float()
    if mode == "max":
        return hidden.float().max(0).values
    return hidden[-1].float()  # "last": decoder embedding models (Qwen3-Embedding)

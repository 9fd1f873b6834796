"""Tensor-parallel ranks read only their slice of each sharded weight (no processes: a
stand-in group names the rank). The model loaded slice by slice holds exactly what the
old path (load the whole model, then cut) kept, and the bytes a rank reads through the
loader are the replicated weights plus its share of the sharded ones: half of them for
two ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.conftest import build_checkpoint
from tests.models.test_moe_mla import ARCHS as MOE_ARCHS
from tests.models.test_moe_mla import adjust_checkpoint
from yun.config import ModelConfig
from yun.distributed.tp import shard_model
from yun.layers.quant_linear import QuantTensor
from yun.models.loader import load_model
from yun.models.slices import Cut, GGUFEntry

CPU = torch.device("cpu")


class Rank:
    """The Collectives of one rank, without a group (loading needs none)."""

    def __init__(self, rank: int, world_size: int = 2):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("loading runs no collective")

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        raise AssertionError("loading runs no collective")


def load_rank(cfg: ModelConfig, rank: int) -> tuple[torch.nn.Module, dict[str, Cut]]:
    cuts: dict[str, Cut] = {}

    def shard(model: torch.nn.Module) -> dict[str, Cut]:
        cuts.update(shard_model(model, Rank(rank)))
        return cuts

    return load_model(cfg, torch.float32, CPU, shard=shard), cuts


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def assert_same_as_cut_after_loading(cfg: ModelConfig, rank: int, model) -> None:
    whole = load_model(cfg, torch.float32, CPU)
    shard_model(whole, Rank(rank))
    ours, theirs = dict(model.named_parameters()), dict(whole.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert torch.equal(p, theirs[name]), name
    assert model.cfg.num_heads == whole.cfg.num_heads
    assert model.cfg.num_kv_heads == whole.cfg.num_kv_heads


@pytest.mark.parametrize("rank", [0, 1])
def test_two_ranks_each_read_half_the_sharded_bytes_and_all_the_replicated(qwen2_path, rank):
    cfg = ModelConfig.from_folder(qwen2_path)  # 4 heads, 2 KV heads: everything splits
    whole = load_model(cfg, torch.float32, CPU)
    model, cuts = load_rank(cfg, rank)
    full = dict(whole.named_parameters())
    sharded = sum(nbytes(full[name]) for name in cuts)
    replicated = sum(nbytes(p) for name, p in full.items() if name not in cuts)
    assert whole.weight_bytes_read == sharded + replicated  # the whole model, read once
    assert cfg.vocab_size % 2 == 0 and sharded > replicated
    assert model.weight_bytes_read == replicated + sharded // 2
    assert_same_as_cut_after_loading(cfg, rank, model)


@pytest.mark.parametrize("kind", ["kv_heads_replicated", "qwen2_moe", "deepseek_v3"])
def test_slice_loading_keeps_what_cutting_the_whole_model_keeps(checkpoint_factory, tmp_path,
                                                               kind):
    """One KV head for two ranks (each reads a copy), MoE experts cut along their
    intermediate size, MLA heads: the same parameters as the old path, and a rank reads
    only the bytes it keeps (a row-parallel bias off rank 0 is not read at all)."""
    if kind == "kv_heads_replicated":
        path = checkpoint_factory("qwen2", num_key_value_heads=1)
    else:
        path = str(tmp_path)
        build_checkpoint(path, MOE_ARCHS[kind])
        adjust_checkpoint(path)
    cfg = ModelConfig.from_folder(path)
    whole_bytes = load_model(cfg, torch.float32, CPU).weight_bytes_read
    for rank in (0, 1):
        model, cuts = load_rank(cfg, rank)
        assert_same_as_cut_after_loading(cfg, rank, model)
        params = dict(model.named_parameters())
        kept = sum(nbytes(p) for name, p in params.items() if name not in cuts)
        for name, cut in cuts.items():
            if not cut.zero:  # the padded rows of a vocabulary shard are not read
                p = params[name]
                kept += nbytes(p) // p.shape[cut.dim] * cut.index.numel()
        assert model.weight_bytes_read == kept < 0.75 * whole_bytes


def test_a_safetensors_cut_reads_each_span(qwen2_path):
    """Spans of rows (q | k | v of one rank) and of columns, as get_slice reads them."""
    from safetensors import safe_open

    from yun.models.slices import SafetensorsEntry, spans

    f = safe_open(os.path.join(qwen2_path, "model.safetensors"), "pt", device="cpu")
    name = "model.layers.0.mlp.gate_proj.weight"
    entry, full = SafetensorsEntry(f, name), f.get_tensor(name)
    index = torch.cat([torch.arange(2, 5), torch.arange(9, 12)])
    assert spans(index) == [(2, 5), (9, 12)]
    assert torch.equal(entry.read(0, index), full[index])
    assert torch.equal(entry.read(1, index), full[:, index])


def q8_0(x: torch.Tensor) -> QuantTensor:
    import gguf
    from gguf.quants import quantize

    data = quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return QuantTensor(int(gguf.GGMLQuantizationType.Q8_0), torch.from_numpy(data),
                       tuple(x.shape), "blk.0.attn_output.weight")


def test_gguf_cuts_take_whole_blocks_or_fall_back_for_that_tensor():
    """Rows: whole rows of blocks (through a lazy row order, as llama's Q/K). Columns on
    block boundaries: whole blocks, still quantized. Columns inside a block: a warning
    and that tensor's floats."""
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    t = q8_0(x)
    exact = t.dequantize()
    order = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])
    rows = GGUFEntry(t, order).read(0, torch.tensor([1, 2]))
    assert rows.qtype == t.qtype and torch.equal(rows.dequantize(), exact[[2, 1]])
    cols = GGUFEntry(t).read(1, torch.arange(64, 128))
    assert cols.qtype == t.qtype and cols.shape == (8, 64)
    assert cols.nbytes * 2 == t.nbytes
    assert torch.equal(cols.dequantize(), exact[:, 64:])
    with pytest.warns(UserWarning, match="blk.0.attn_output.weight: .* split a 32-value"):
        split = GGUFEntry(t).read(1, torch.arange(48, 112))
    assert split.is_float and torch.equal(split.data, exact[:, 48:112])


def test_a_gguf_rank_holds_quantized_slices_of_the_whole_files_weights(tmp_path):
    """A Q8_0 GGUF file (written with gguf-py): each rank's quantized projections are
    exactly the rows or block-columns of the whole model's, and it reads about half of
    the sharded bytes."""
    gguf_path = write_q8_0_gguf(tmp_path)
    cfg = ModelConfig.load(gguf_path)
    whole = load_model(cfg, torch.float32, CPU)
    for rank in (0, 1):
        model, cuts = load_rank(cfg, rank)
        for name, cut in cuts.items():
            if cut.zero or "layers" not in name:
                continue
            mod = name.rsplit(".", 1)[0]
            ours = dense_weight(model.get_submodule(mod))
            full = dense_weight(whole.get_submodule(mod))
            assert torch.equal(ours, full.index_select(cut.dim, cut.index)), name
        assert type(model.get_submodule("model.layers.0.self_attn.o_proj")).__name__ == \
            "QuantLinear"
        assert model.weight_bytes_read < 0.7 * whole.weight_bytes_read


def dense_weight(mod: torch.nn.Module) -> torch.Tensor:
    if hasattr(mod, "qweight"):
        w = mod.qweight
        return torch.cat([w.part(i).dequantize() for i in range(len(w.qtypes))])
    return mod.weight.detach()


def write_q8_0_gguf(folder) -> str:
    """A tiny llama GGUF (hidden 64, 4 heads of 16, 2 KV heads, FFN 128) in Q8_0 with
    an F32 embedding and norms, written with gguf-py."""
    import gguf
    from gguf.quants import quantize

    g = torch.Generator().manual_seed(0)
    E, H, KvH, D, I, V = 64, 4, 2, 16, 128, 256  # noqa: E741
    path = str(folder / "tiny-q8_0.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(E)
    w.add_feed_forward_length(I)
    w.add_head_count(H)
    w.add_head_count_kv(KvH)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    tokens = [f"t{i}".encode() for i in range(V)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def add_q(name: str, x: torch.Tensor) -> None:
        q = quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    w.add_tensor("token_embd.weight", rand(V, E).numpy())
    w.add_tensor("output_norm.weight", torch.ones(E).numpy())
    add_q("output.weight", rand(V, E))
    w.add_tensor("blk.0.attn_norm.weight", torch.ones(E).numpy())
    w.add_tensor("blk.0.ffn_norm.weight", torch.ones(E).numpy())
    add_q("blk.0.attn_q.weight", rand(H * D, E))
    add_q("blk.0.attn_k.weight", rand(KvH * D, E))
    add_q("blk.0.attn_v.weight", rand(KvH * D, E))
    add_q("blk.0.attn_output.weight", rand(E, H * D))
    add_q("blk.0.ffn_gate.weight", rand(I, E))
    add_q("blk.0.ffn_up.weight", rand(I, E))
    add_q("blk.0.ffn_down.weight", rand(E, I))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Read a Hugging Face checkpoint folder into a model, with errors that name the file
and the tensor. Safetensors only (single file or sharded with an index), memory-mapped."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from yun.config import ModelConfig
from yun.layers.linear import Linear
from yun.layers.quant_linear import QuantEmbedding, QuantLinear, QuantTensor, QuantWeight
from yun.models.errors import CheckpointError
from yun.models.registry import arch_spec, model_class
from yun.models.slices import Cut, SafetensorsEntry, nbytes, read_entry, shape_of
from yun.models.spec import Loadable, LoaderHooks

Shard = Callable[[nn.Module], dict[str, Cut]]  # shapes a meta model to one rank's share

__all__ = ["CheckpointError", "load_model", "load_weights", "resolve_dtype"]


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                tensor = next(t for t, f in weight_map.items() if f == name)
                raise CheckpointError(
                    f"{os.path.join(folder, name)}: missing (listed in {index} for {tensor})")
        return [os.path.join(folder, n) for n in files]
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found "
                              "(only safetensors checkpoints are supported)")
    return [os.path.join(folder, n) for n in files]


def iter_tensors(files: list[str]) -> Iterator[tuple[str, str, SafetensorsEntry]]:
    """Yield (file, tensor name, entry) lazily, file by file: nothing is read until the
    loader reads an entry, whole or only the part one rank keeps."""
    for path in files:
        try:
            f = safe_open(path, framework="pt", device="cpu")
            names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        for name in names:
            try:
                entry = SafetensorsEntry(f, name)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
            yield path, name, entry


def loader_hooks(model: nn.Module) -> LoaderHooks:
    """What `model` declares the loader may do with it (yun/models/spec.py); TypeError
    for a model that declares nothing."""
    if not isinstance(model, Loadable):
        raise TypeError(f"{type(model).__name__} declares no loader_hooks(): a model the "
                        "loader fills returns its LoaderHooks (yun/models/spec.py)")
    hooks = model.loader_hooks()
    if not isinstance(hooks, LoaderHooks):
        raise TypeError(f"{type(model).__name__}.loader_hooks() returned "
                        f"{type(hooks).__name__}, not LoaderHooks")
    return hooks


def _target(hooks: LoaderHooks, name: str) -> tuple[str, Any]:
    """Checkpoint name -> (our parameter name, part index in a fused parameter):
    `weight_target` first (None: not its kind), then the `stacked` table."""
    if (found := hooks.weight_target(name)) is not None:
        return found
    parts = name.split(".")
    for ckpt, (ours, idx) in hooks.stacked.items():
        if ckpt in parts:
            return ".".join(ours if p == ckpt else p for p in parts), idx
    return name, None


def load_weights(model: nn.Module, files: list[str]) -> None:
    """Fill `model` from safetensors files (HF names)."""
    load_tensors(model, iter_tensors(files), os.path.dirname(files[0]))


def load_tensors(model: nn.Module, tensors: Iterable[tuple[str, str, Any]], label: str,
                 keep_quantized: bool = False, quantize_to: str | None = None,
                 cuts: dict[str, Cut] | None = None) -> int:
    """Fill `model` from (file, HF name, tensor) triples; every parameter must be filled.
    Returns the bytes of the tensors read (what this process materialised of them).

    A tensor is a torch tensor, a `QuantTensor` (GGUF) or a lazy `slices.Entry`. `cuts`
    (tensor parallelism: the model was sharded on the meta device) names the parameters
    of which only some positions are read. With `keep_quantized`, quantized
    weights of `Linear` layers and of the token embedding stay quantized: those modules
    are swapped for their quantized forms once everything is read; any other quantized
    tensor is dequantized into its parameter. `quantize_to` (e.g. "q8_0") quantizes dense
    weights of those same modules into that GGUF block type while loading.
    """
    hooks = loader_hooks(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected: set[tuple[str, Any]] = set()
    for pname in params:
        mod = modules[pname.rsplit(".", 1)[0]] if "." in pname else model
        parts = _parts(mod)
        expected.update((pname, i) for i in parts) if parts else expected.add((pname, None))
    loaded: set[tuple[str, Any]] = set()
    kept: dict[str, dict[Any, QuantTensor]] = {}  # module name -> part -> quantized weight
    read = 0
    for path, name, entry in tensors:
        if (name.endswith(hooks.ignored_suffixes) or hooks.skip(name)
                or (hooks.tied_head and name == "lm_head.weight")):
            continue
        target, part = _target(hooks, name)
        param = params.get(target)
        if param is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} "
                                  f"(no such parameter in {type(model).__name__})")
        dest = param.data
        modname = target.rsplit(".", 1)[0]
        if part is not None:
            dest = dest[modules[modname].part_slice(part)]
        loaded.add((target, part))
        cut = cuts.get(target) if cuts else None
        if cut is not None and cut.zero:  # nothing to read on this rank
            dest.zero_()
            continue
        tensor, dest = _read(entry, cut, part, dest, path, name)
        read += nbytes(tensor)
        if quantize_to and _quantizable(modules[modname], target) and tensor.dim() == 2:
            tensor = _quantize(tensor, quantize_to, name)
        if isinstance(tensor, QuantTensor):
            if ((keep_quantized or quantize_to) and not tensor.is_float
                    and _quantizable(modules[modname], target)):
                kept.setdefault(modname, {})[part] = tensor
                continue
            tensor = tensor.dequantize() if not tensor.is_float else tensor.data
        with torch.no_grad():
            dest.copy_(tensor)
    missing = sorted(expected - loaded, key=str)
    if missing:
        names = [_checkpoint_name(hooks, p, i) for p, i in missing]
        shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
        raise CheckpointError(f"{label}: missing tensor(s) {shown} ({len(names)} missing)")
    if kept:
        _swap_quantized(model, modules, kept, hooks.tied_head)
    return read


def _read(entry: Any, cut: Cut | None, part: Any, dest: torch.Tensor, path: str,
          name: str) -> tuple[Any, torch.Tensor]:
    """The entry, whole or cut, after checking its full shape -> (tensor, where it goes).
    A cut keeps `index` along one dimension; parts of a fused parameter lie along the
    checkpoint tensor's first dimension; positions past the kept ones stay zero."""
    shape = shape_of(entry)
    if cut is None or cut.dim is None or cut.index is None:
        if tuple(dest.shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, "
                                  f"expected {tuple(dest.shape)}")
        return read_entry(entry), dest
    dim = cut.dim - _dropped(part)  # in the checkpoint tensor's dimensions
    fused = None if dim != 0 or part is None or len(cut.full_sizes or ()) < 2 else (
        part if isinstance(part, int) else part[-1])
    index = cut.index if fused is None else cut.part_index(fused)
    full = list(dest.shape)
    full[dim] = cut.full_length(fused)
    if tuple(full) != shape:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, "
                              f"expected {tuple(full)}")
    kept = int(index.numel())
    if dest.shape[dim] > kept:  # a padded vocabulary shard
        dest.narrow(dim, kept, dest.shape[dim] - kept).zero_()
        dest = dest.narrow(dim, 0, kept)
    try:
        return read_entry(entry, dim, index), dest
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e


def _dropped(part: Any) -> int:
    """Leading dimensions a part's index removes (an expert's (e, rows) part: one)."""
    return len(part) - 1 if isinstance(part, tuple) else 0


def _quantize(tensor: torch.Tensor, kind: str, name: str) -> QuantTensor:
    """A dense [out, in] weight -> GGUF blocks of `kind`, with gguf-py's quantizers."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:
        return tensor  # rows that do not split into blocks stay dense
    data = quantize(tensor.float().cpu().numpy(), qtype)  # uint8 [out, row_bytes]
    return QuantTensor(int(qtype), torch.from_numpy(data), tuple(tensor.shape), name)


def _quantizable(mod: nn.Module, target: str) -> bool:
    """Modules that run on quantized weights: yun's Linear layers, the token embedding."""
    return target.endswith(".weight") and (isinstance(mod, Linear) or (
        isinstance(mod, nn.Embedding) and target.endswith("embed_tokens.weight")))


def _swap_quantized(model: nn.Module, modules: dict[str, nn.Module],
                    kept: dict[str, dict[Any, QuantTensor]], tied_head: bool) -> None:
    """Replace each module whose weight stayed quantized by its quantized form. Parts
    of a fused layer that were dense (e.g. an F16 V next to Q4_K Q and K) join as float
    parts."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for modname, parts in kept.items():
        mod = modules[modname]
        merged = bool(getattr(mod, "output_sizes", None))  # parts 0..n-1, else one (None)
        sizes = list(mod.output_sizes) if merged else [mod.weight.shape[0]]
        tensors = []
        for i in range(len(sizes)):
            t = parts.get(i if merged else None)
            if t is None:  # a dense part of a fused layer
                w = mod.weight.data[mod.part_slice(i)]
                t = QuantTensor(0, w.float().contiguous(), tuple(w.shape), f"{modname}[{i}]")
            tensors.append(t)
        weight = QuantWeight(tensors)
        parent_name, _, attr = modname.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if attr == "embed_tokens":
            setattr(parent, attr, QuantEmbedding(weight, dtype))
            if tied_head and isinstance(getattr(model, "lm_head", None), Linear):
                model.lm_head = QuantLinear(weight, None)
        else:
            setattr(parent, attr, QuantLinear(weight, mod.bias, sizes))


def _parts(mod: nn.Module) -> list[Any]:
    """The parts a fused parameter is filled from: `mod.parts()` if the module lists them
    (e.g. (expert, projection) pairs), else one per entry of `output_sizes`."""
    if hasattr(mod, "parts"):
        return list(mod.parts())
    return list(range(len(getattr(mod, "output_sizes", []))))


def _checkpoint_name(hooks: LoaderHooks, pname: str, part: Any) -> str:
    if part is None:
        return pname
    if found := hooks.checkpoint_name(pname, part):
        return found
    for ckpt, (ours, idx) in hooks.stacked.items():
        if idx == part and f".{ours}." in f".{pname}":
            return pname.replace(ours, ckpt)
    return f"{pname}[part {part}]"


def resolve_dtype(cfg: ModelConfig, dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        name = cfg.torch_dtype
        dt = getattr(torch, name, None) if isinstance(name, str) else None
        dt = dt if isinstance(dt, torch.dtype) else torch.float32
        if dt == torch.float16 and device.type == "cpu":
            dt = torch.bfloat16  # fp16 matmuls are slow and overflow-prone on CPU
        return dt
    dt = getattr(torch, dtype)
    if dt == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
    return dt


def build_empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                      label: str, cls: type[nn.Module] | None = None,
                      shard: Shard | None = None) -> nn.Module:
    """The model's modules (of `cls`, default: the architecture's class, built with the
    architecture's spec) with
    uninitialised weights on `device` (no time spent on random init), computed buffers
    (rope tables) built. `shard` reshapes the model to one tensor-parallel rank's share
    while it is still on the meta device."""
    cls = cls or model_class(cfg.architecture, label)
    with torch.device("meta"):
        model = cls(cfg, arch_spec(cfg, label))
    if shard is not None:
        shard(model)
    model = model.to_empty(device=device).to(dtype=dtype)
    loader_hooks(model).tie()
    for module in model.modules():  # computed buffers are not in checkpoints
        if hasattr(module, "build_buffers"):
            module.build_buffers(device)
    return model


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None, shard: Shard | None = None) -> nn.Module:
    """An HF folder or a GGUF file (cfg.path) -> the loaded model in eval mode;
    `quantization` quantizes an HF checkpoint's dense weights while loading; `shard`
    (tensor parallelism) keeps one rank's share, reading only that part of each sharded
    tensor. `model.weight_bytes_read` is the bytes of checkpoint tensors it read."""
    cuts: dict[str, Cut] = {}

    def shaped(model: nn.Module) -> dict[str, Cut]:
        cuts.update(shard(model))
        return cuts

    shaping = shaped if shard is not None else None
    if cfg.is_gguf:  # quantized tensors stay quantized
        from yun.models.gguf_file import open_gguf
        from yun.models.gguf_loader import gguf_tensors

        model = build_empty_model(cfg, dtype, device, cfg.path, shard=shaping)
        read = load_tensors(model, gguf_tensors(open_gguf(cfg.path), cfg), cfg.path,
                            keep_quantized=True, cuts=cuts)
    else:
        files = checkpoint_files(cfg.path)
        model = build_empty_model(cfg, dtype, device, os.path.join(cfg.path, "config.json"),
                                  shard=shaping)
        read = load_tensors(model, iter_tensors(files), os.path.dirname(files[0]),
                            quantize_to=quantization, cuts=cuts)
    model.weight_bytes_read = read
    model.eval()
    return model

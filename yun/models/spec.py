"""The two small contracts of a model file: what its architecture changes in the shared
decoder (`ArchSpec`, chosen per architecture in yun/models/registry.py and passed to the
constructors), and what the loader may ask of it (`LoaderHooks`, which every model the
loader fills returns from `loader_hooks()`). A leaf: models, the registry and the loader
import it, it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, runtime_checkable

Attention = Literal["gqa", "mla"]
Moe = Literal["none", "qwen", "deepseek"]
_ATTENTIONS: tuple[str, ...] = ("gqa", "mla")
_MOES: tuple[str, ...] = ("none", "qwen", "deepseek")


@dataclass(frozen=True)
class ArchSpec:
    """What one architecture changes in the skeleton of yun/models/decoder.py:
    x -> embed -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head."""

    attention: Attention = "gqa"  # gqa: Llama's grouped-query; mla: DeepSeek's latent
    qkv_bias: bool = False  # a bias on Q, K and V (Qwen2); gqa only
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3); gqa only
    mlp_bias: bool = False  # biases in the dense SwiGLU MLPs
    moe: Moe = "none"  # which layers' MLP is a mixture of experts, by whose rule
    tie_word_embeddings: bool = False  # lm_head shares the token embedding
    mtp_in_checkpoint: bool = False  # layers N.. of the checkpoint are MTP: skipped
    encoder: bool = False  # a bidirectional encoder (BERT), not this skeleton

    def __post_init__(self) -> None:
        if self.attention not in _ATTENTIONS:
            raise ValueError(f"attention must be one of {_ATTENTIONS}, got {self.attention!r}")
        if self.moe not in _MOES:
            raise ValueError(f"moe must be one of {_MOES}, got {self.moe!r}")
        if self.attention == "mla" and (self.qkv_bias or self.qk_norm):
            raise ValueError("qkv_bias and qk_norm are grouped-query attention options; "
                             "MLA has neither")


WeightTarget = Callable[[str], "tuple[str, Any] | None"]
CheckpointName = Callable[[str, Any], "str | None"]


def _no_target(name: str) -> None:
    return None


def _no_name(pname: str, part: Any) -> None:
    return None


def _load_all(name: str) -> bool:
    return False


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class LoaderHooks:
    """Everything yun/models/loader.py asks of a model, declared in one place.

    A checkpoint name goes: skipped (`skip`, `ignored_suffixes`, a tied head) ->
    `weight_target` (None: not its kind) -> the `stacked` table -> the name as is.
    """

    # checkpoint projection -> (our fused parameter, its part): q_proj -> (qkv_proj, 0)
    stacked: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    ignored_suffixes: tuple[str, ...] = ()  # computed, not loaded (rotary_emb.inv_freq)
    skip: Callable[[str], bool] = _load_all  # left out on purpose (MTP layers, a pooler)
    weight_target: WeightTarget = _no_target  # names the table cannot express (experts)
    checkpoint_name: CheckpointName = _no_name  # weight_target's inverse, for messages
    tied_head: bool = False  # lm_head.weight is the embedding's: not read
    tie: Callable[[], None] = _nothing  # re-share tied weights after the model moved


@runtime_checkable
class Loadable(Protocol):
    """A model the loader can fill."""

    def loader_hooks(self) -> LoaderHooks: ...

"""Shared fixtures: small random-weight checkpoints built with transformers (seeded),
saved with save_pretrained beside a Qwen2 tokenizer, loaded from that folder.

The tokenizer is the real Qwen2 one cut to its first SMALL_ORDINARY tokens (the 256 bytes
and the merges that build the rest, in Qwen's own rank order, so it is a consistent
byte-level BPE that encodes any text), with the 22 added tokens renumbered right after
them: a 152k-wide head and sampler cost most of a tiny model's time and test nothing.
Tests of the real vocabulary pass `real_vocab=True` (or use yun.demo's tokenizer)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from yun.demo import qwen2_tokenizer_json, write_qwen2_tokenizer

REAL_VOCAB = 151936  # the real Qwen2 vocabulary size (tokenizer ids go up to 151664)
REAL_ENDOFTEXT, REAL_IM_END = 151643, 151645
SMALL_ORDINARY = 4096  # ordinary tokens kept by the small tokenizer: ids 0..4095
ENDOFTEXT, IM_START, IM_END = SMALL_ORDINARY, SMALL_ORDINARY + 1, SMALL_ORDINARY + 2
VOCAB = SMALL_ORDINARY + 128  # the tiny models' vocabulary: the tokenizer's 4118, padded

BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    rms_norm_eps=1e-6, eos_token_id=IM_END, bos_token_id=ENDOFTEXT,
)
REAL_VOCAB_CONFIG: dict[str, Any] = dict(vocab_size=REAL_VOCAB, eos_token_id=REAL_IM_END,
                                         bos_token_id=REAL_ENDOFTEXT)


def small_qwen2_tokenizer_json(ordinary: int = SMALL_ORDINARY) -> str:
    """The real Qwen2 tokenizer.json cut to its first `ordinary` tokens (Qwen's merge k
    makes token 256 + k, so the first `ordinary` - 256 merges build exactly those), the
    added tokens renumbered from `ordinary` on in their order."""
    tok = json.loads(qwen2_tokenizer_json())
    model = tok["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < ordinary}
    model["merges"] = model["merges"][:ordinary - 256]
    first = min(a["id"] for a in tok["added_tokens"])
    for added in tok["added_tokens"]:
        added["id"] = added["id"] - first + ordinary
    return json.dumps(tok, ensure_ascii=False)


def write_small_qwen2_tokenizer(folder: str, max_length: int) -> None:
    """write_qwen2_tokenizer's two files (the Qwen2.5 chat template), the small vocabulary."""
    write_qwen2_tokenizer(folder, max_length=max_length)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(small_qwen2_tokenizer_json())

ARCHS: dict[str, dict[str, Any]] = {
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(architecture="Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=False,
                  rope_theta=1e6),
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False,
                  rope_theta=5e5, num_key_value_heads=1),
    "llama3": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, rope_theta=5e5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64},
                   attention_bias=True, mlp_bias=True),
}


def build_checkpoint(folder: str, arch: dict[str, Any], seed: int = 0,
                     dtype: torch.dtype = torch.float32, real_vocab: bool = False) -> str:
    """A seeded random checkpoint of `arch` in `folder`: the small vocabulary and
    tokenizer, or the real 152k ones with `real_vocab`."""
    import transformers

    kwargs = {**BASE, **(REAL_VOCAB_CONFIG if real_vocab else {}), **arch}
    name = kwargs.pop("architecture")
    config_cls = getattr(transformers, name.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, name)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    # Give norms non-trivial weights so parity tests see them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    write = write_qwen2_tokenizer if real_vocab else write_small_qwen2_tokenizer
    write(folder, max_length=kwargs["max_position_embeddings"])
    return folder


def shared_root(tmp_path_factory) -> Path:
    """A folder this run's processes share: under pytest-xdist (`make test` runs two
    workers) the parent of the workers' base temp folders, else the base temp folder. What
    is built there (seeded checkpoints, GGUF conversions) is built once per run."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


_HELD: dict[str, int] = {}  # lock path -> depth, so one process may nest built_once


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """An OS file lock at `path` (released if the process dies), re-entrant within a
    process: a worker builds a shared file while the others wait for it."""
    key = str(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    with open(path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD[key] = 0
            fcntl.flock(held, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Seeded checkpoints, each built once per run (shared by xdist workers)."""
    root = shared_root(tmp_path_factory)

    def make(kind: str = "qwen2", real_vocab: bool = False, **overrides: Any) -> str:
        key = kind + repr(real_vocab) + repr(sorted(overrides.items()))
        folder = root / f"ckpt-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        with run_lock(root / "checkpoints.lock"):
            if not (folder / ".built").exists():
                shutil.rmtree(folder, ignore_errors=True)  # a build cut off half-way
                folder.mkdir()
                build_checkpoint(str(folder), {**ARCHS[kind], **overrides},
                                 real_vocab=real_vocab)
                (folder / ".built").touch()
        return str(folder)

    return make


@pytest.fixture(scope="session")
def qwen2_path(checkpoint_factory) -> str:
    return checkpoint_factory("qwen2")


def worker_cpus() -> set[int] | None:
    """Under pytest-xdist, this worker's share of the CPUs (worker i of n: every n-th one
    from i), or None. Engines size torch's threads by the affinity mask (and subprocesses
    inherit it), so two workers on two cores run one thread each instead of four."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return None
    return set(cpus[int(worker[2:]) % count::count])


def pytest_configure(config) -> None:
    cpus = worker_cpus()
    if cpus:  # before collection imports anything that starts threads
        os.sched_setaffinity(0, cpus)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    cpus = worker_cpus()
    torch.set_num_threads(len(cpus) if cpus else max(1, min(2, os.cpu_count() or 1)))

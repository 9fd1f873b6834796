"""How an embedding model turns hidden states into one vector: the pooling mode and
whether to normalise, read from the checkpoint's sentence-transformers files
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`). No torch here:
the runner applies it (`ModelRunner.embed`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

POOLING_MODES = ("mean", "cls", "last", "max")
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
             "pooling_mode_lasttoken": "last", "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class PoolingConfig:
    mode: str  # one of POOLING_MODES
    normalize: bool = True
    max_seq_length: int | None = None  # sentence-transformers' truncation length

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")


def _read(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def has_sentence_transformers_config(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "modules.json"))


def load_pooling(folder: str, is_encoder: bool) -> PoolingConfig:
    """The checkpoint's pooling; without sentence-transformers files: CLS for encoders,
    the last token for decoders, normalised either way."""
    modules = _read(os.path.join(folder, "modules.json")) if os.path.isdir(folder) else None
    st = _read(os.path.join(folder, "sentence_bert_config.json")) if modules else None
    max_len = st.get("max_seq_length") if isinstance(st, dict) else None
    if not isinstance(modules, list):
        return PoolingConfig("cls" if is_encoder else "last")
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    mode = "cls" if is_encoder else "last"
    if "Pooling" in types:
        cfg = _read(os.path.join(folder, types["Pooling"].get("path", ""), "config.json")) or {}
        chosen = [m for key, m in _ST_MODES.items() if cfg.get(key)]
        if len(chosen) > 1:
            raise ValueError(f"{folder}: pooling combines {chosen}; only one mode is supported")
        if chosen:
            mode = chosen[0]
        elif cfg.get("pooling_mode") in POOLING_MODES + ("lasttoken",):
            mode = "last" if cfg["pooling_mode"] == "lasttoken" else cfg["pooling_mode"]
    return PoolingConfig(mode, normalize="Normalize" in types, max_seq_length=max_len)

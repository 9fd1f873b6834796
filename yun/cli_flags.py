"""CLI flags generated from config dataclasses: one --flag per field, its help from the
field's metadata, so the CLI, `yun bench` and the Python API never disagree about what can
be set. A leaf of the command-line modules (yun/cli.py and yun/bench/cli.py both use it)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from yun.config import EngineConfig, parse_size

_BOOL_ALIASES = {"enable_prefix_caching": "--no-prefix-caching",
                 "enable_chunked_prefill": "--no-chunked-prefill"}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()
                        ) -> None:
    """One flag per dataclass field, named --field-name, help from field metadata."""
    for f in fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text + " (default: %(default)s)")
            if f.name in _BOOL_ALIASES:
                parser.add_argument(_BOOL_ALIASES[f.name], dest=f.name, action="store_false",
                                    help=f"same as --no-{f.name.replace('_', '-')}")
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": help_text + " (default: %(default)s)"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("repeat"):
            kwargs["action"] = "append"
        ftype = str(f.type)
        if f.name == "kv_cache_memory" or f.metadata.get("size"):
            kwargs["type"] = parse_size
        elif "int" in ftype:
            kwargs["type"] = int
        elif "float" in ftype:
            kwargs["type"] = float
        parser.add_argument(flag, **kwargs)


def engine_config_from(args: argparse.Namespace, **override: Any) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    values.update(override)
    return EngineConfig(**values)

"""Where a model's files come from: the demo, a local folder, or the Hugging Face hub."""

from __future__ import annotations

import os

from yun.demo import DemoShape, build_demo_checkpoint


def cache_dir() -> str:
    base = os.environ.get("YUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "yun")
    return base


def demo_model_path() -> str:
    """The demo checkpoint's folder, built on first use (about 1 GB, a minute or so)."""
    folder = os.path.join(cache_dir(), "demo-qwen2.5-0.5b-random-v1")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"yun: building the demo checkpoint (random weights) in {folder} ...", flush=True)
        build_demo_checkpoint(folder, DemoShape())
    return folder


def resolve_model(model: str | None) -> str:
    """A folder holding config.json, weights and tokenizer for `model`.

    None -> the demo model; an existing folder -> itself; otherwise a hub id, downloaded
    with huggingface_hub (a clear error when offline or not found).
    """
    if model is None:
        return demo_model_path()
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"{model}: no such model folder")
    return _download(model)


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise RuntimeError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
            "(offline?). Download it elsewhere and pass its folder, e.g. --model /path/to/model"
        ) from e
    except HfHubHTTPError as e:
        raise RuntimeError(f"{repo_id}: cannot download from the Hugging Face hub ({e})") from e
    except Exception as e:  # network errors surface as many types
        raise RuntimeError(f"{repo_id}: cannot download from the Hugging Face hub ({e})") from e

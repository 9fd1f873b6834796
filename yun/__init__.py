"""yun (云): an inference and serving engine for open-weight language models."""

from yun import isa_cap

isa_cap.apply_to_torch()  # YUN_MAX_CPU_ISA: before anything imports torch

from yun.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from yun.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # Import the engine (and torch) only when the offline API is used.
    if name == "LLM":
        from yun.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "__version__"]

"""The checks a prompt and its sampling params must pass before a request is queued:
one place for the engine (`LLMEngine.add_request`) and the server (before its response
starts, so a stream never reports them after its 200). Each failure is an InvalidParam
naming the field at fault. No torch here.
"""

from __future__ import annotations

from yun.sampling_params import InvalidParam, SamplingParams


def check_prompt(ids: list[int], params: SamplingParams, vocab_size: int,
                 max_model_len: int, param: str = "prompt") -> None:
    """Raise InvalidParam unless `ids` (the prompt, sent as field `param`) with `params`
    fits the model: non-empty, in the vocabulary, within the context with max_tokens."""
    n = len(ids)
    if n == 0:
        raise InvalidParam(param, "the prompt is empty: at least one token is needed")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParam(param, f"token id {bad} is out of range: the vocabulary has "
                                  f"{vocab_size} tokens")
    bad = next((t for t in params.logit_bias or {} if t >= vocab_size), None)
    if bad is not None:
        raise InvalidParam("logit_bias", f"logit_bias names token id {bad}, out of range: "
                                         f"the vocabulary has {vocab_size} tokens")
    if n >= max_model_len:
        raise InvalidParam(param, f"the prompt has {n} tokens, but the model's context "
                                  f"length is {max_model_len} tokens")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise InvalidParam(
            "max_tokens", f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is "
            f"{n + params.max_tokens} tokens, more than the model's context length of "
            f"{max_model_len} tokens")


__all__ = ["InvalidParam", "check_prompt"]

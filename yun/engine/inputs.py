"""Inputs: one path from a request to what the engine runs, shared by every front end
(the HTTP server, `yun generate` / `yun chat`, `LLM.generate` / `LLM.chat`).

- `render_chat`: messages (and tools) -> (prompt text, prompt ids), through the model's
  own chat template, then encoded without adding special tokens (the template wrote them).
- `InputProcessor.sampling_params`: the one place a front end builds the engine's
  `SamplingParams` (validated once, at construction, with the engine's EOS ids filled in,
  so `LLMEngine.add_request` takes them as they are).
- `check_prompt`: the checks a prompt and its params must pass before a request is
  queued: made by the engine (`LLMEngine.add_request`) and by the server before its
  response starts (so a stream never reports them after its 200).

Each failure is an InvalidParam naming the field at fault. No torch, no HTTP here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Mapping, Protocol, Sequence

from yun.sampling_params import InvalidParam, SamplingParams

Prompt = tuple[str | None, list[int]]  # (text if known, token ids)

# chat_template_kwargs keys that would change what apply_chat_template returns.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class PromptTokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str: ...


# ---- messages -> prompt ids ------------------------------------------------------------------
def chat_message(m: Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates expect it: role "developer" as "system", content a
    string (text parts joined), tool-call arguments a dict."""
    content = m.get("content")
    if isinstance(content, list):
        content = "\n".join((p.get("text") if isinstance(p, Mapping) else str(p)) or ""
                            for p in content)
    d: dict[str, Any] = {"role": "system" if m.get("role") == "developer" else m.get("role"),
                         "content": content or ""}
    if m.get("tool_calls") and not content:  # as OpenAI sends it (see render_chat)
        d["content"] = None
    for key in ("name", "tool_call_id"):
        if m.get(key):
            d[key] = m[key]
    if m.get("tool_calls"):
        d["tool_calls"] = [_parsed_arguments(call) for call in m["tool_calls"]]
    return d


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends tool-call arguments as JSON text; templates (e.g. Qwen's) want a dict."""
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
        except ValueError:
            pass
    return call


def chat_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool definition as templates expect it: OpenAI's shape, unset fields left out,
    and `parameters` always an object schema (some templates read
    `parameters.properties` unconditionally)."""
    d = {k: v for k, v in tool.items() if v is not None}
    fn = {k: v for k, v in (d.get("function") or {}).items() if v is not None}
    fn["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", **d, "function": fn}


def render_chat(tok: PromptTokenizer, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True,
                template_kwargs: Mapping[str, Any] | None = None,
                tools: list[dict[str, Any]] | None = None) -> tuple[str, list[int]]:
    """The conversation rendered by the model's chat template (with the tools'
    definitions when given, as the template lays them out), and its token ids: the
    server's chat endpoints, `LLM.chat` and `yun chat` all render here.
    InvalidParam ("messages" or "chat_template_kwargs") for what cannot be rendered."""
    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise InvalidParam("chat_template_kwargs",
                           f"chat_template_kwargs may not set {', '.join(reserved)}")
    if tools:
        kwargs["tools"] = [chat_tool(t) for t in tools]
    dicts = [chat_message(m) for m in messages]
    try:
        text = tok.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt,
                                       **kwargs)
    except Exception as e:  # template errors are about the input (roles, content)
        if not any(d["content"] is None for d in dicts):
            raise InvalidParam("messages", f"cannot render the chat template: {e}") from e
        # A tool-calling turn's null content reaches the template as a missing key, which
        # some templates handle and others (string operations on it) do not: try "".
        for d in dicts:
            d["content"] = d["content"] or ""
        try:
            text = tok.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
        except Exception as e2:
            raise InvalidParam("messages", f"cannot render the chat template: {e2}") from e2
    if not isinstance(text, str):
        raise InvalidParam("messages", "the chat template did not render to text")
    return text, tok.encode(text, add_special_tokens=False)


def encode_prompt(tok: PromptTokenizer, text: str, add_special_tokens: bool = True
                  ) -> list[int]:
    """A plain (not chat-templated) prompt's ids: the completions API, `LLM.generate`'s
    strings and `yun generate` (the tokenizer's BOS and the like, unless told not to)."""
    return tok.encode(text, add_special_tokens=add_special_tokens)


# ---- params ----------------------------------------------------------------------------------
def eos_token_ids(model_eos: Sequence[int], tokenizer_eos: int | None) -> tuple[int, ...]:
    """The ids that end a generation: the model's (generation config), then the
    tokenizer's EOS if it is not among them."""
    ids = list(model_eos)
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)
    return tuple(ids)


class InputProcessor:
    """A request -> (prompt ids, validated params) for one model: the engine has one
    (`LLMEngine.inputs`, which `LLM` and the CLI use), the server one over its
    EngineClient's tokenizer and model config (so the same ids and EOS). The prompt
    checks read the engine's live limits: `check_prompt` takes them."""

    def __init__(self, tokenizer: PromptTokenizer, eos: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[int]]:
        return render_chat(self.tokenizer, messages, add_generation_prompt, template_kwargs,
                           tools)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, text, add_special_tokens)

    def sampling_params(self, **fields: Any) -> SamplingParams:
        """The request's SamplingParams, built and validated once (InvalidParam naming the
        field), with this model's EOS ids, as the engine runs them."""
        return SamplingParams(**fields, _eos_token_ids=self.eos_token_ids)

    def for_engine(self, params: SamplingParams, **changes: Any) -> SamplingParams:
        """`params` (a caller's, e.g. `LLM.generate`'s) with `changes` and this model's
        EOS ids: one copy, which the engine then takes as it is."""
        return replace(params, **changes, _eos_token_ids=self.eos_token_ids)


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


__all__ = ["InputProcessor", "InvalidParam", "Prompt", "chat_message", "chat_tool",
           "check_prompt", "encode_prompt", "eos_token_ids", "render_chat"]

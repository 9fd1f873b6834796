"""Requests -> prompt token ids: the model's own chat template, or the completions prompt
forms. Plain functions over the tokenizer; the server runs them in a worker thread. Rendering
and encoding are the engine's (yun/engine/inputs.py): `LLM` and the CLI share them."""

from __future__ import annotations

from typing import Any

from yun.engine import inputs
from yun.engine.inputs import Prompt, PromptTokenizer, encode_prompt
from yun.sampling_params import InvalidParam
from yun.server.errors import bad_request
from yun.server.protocol import ChatMessage, CompletionRequest

__all__ = ["Prompt", "PromptTokenizer", "check_history", "completion_prompts", "render_chat"]


def _check_call(call: dict[str, Any], where: str) -> str | None:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request("each tool call needs a function with a name", where)
    if not isinstance(fn.get("arguments", ""), (str, dict)):
        raise bad_request("a tool call's arguments must be JSON text (or an object)", where)
    cid = call.get("id")
    return cid if isinstance(cid, str) else None


def check_history(messages: list[ChatMessage]) -> None:
    """400 for a conversation no model should be asked to continue: a tool message without
    content or tool_call_id (or answering no earlier call), a user or system message
    without content, an assistant message with neither content nor tool calls, a tool
    call without a function name."""
    calls: set[str] = set()
    anonymous = False  # an earlier call came without an id: cannot match answers to calls
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "tool":
            if not m.tool_call_id:
                raise bad_request("a tool message needs the tool_call_id it answers",
                                  f"{where}.tool_call_id")
            if m.content is None:
                raise bad_request("a tool message needs content (the tool's result)",
                                  f"{where}.content")
            if not anonymous and m.tool_call_id not in calls:
                raise bad_request(f"tool_call_id {m.tool_call_id!r} answers no tool call of "
                                  "an earlier assistant message", f"{where}.tool_call_id")
        elif m.role == "assistant":
            if m.content is None and not m.tool_calls:
                raise bad_request("an assistant message needs content or tool_calls",
                                  f"{where}.content")
            for j, call in enumerate(m.tool_calls or []):
                cid = _check_call(call, f"{where}.tool_calls[{j}]")
                if cid:
                    calls.add(cid)
                else:
                    anonymous = True
        elif m.content is None:
            raise bad_request(f"a {m.role} message needs content", f"{where}.content")


def render_chat(tok: PromptTokenizer, messages: list[ChatMessage],
                add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None,
                tools: list[dict[str, Any]] | None = None) -> Prompt:
    """The conversation rendered by the model's chat template (with the tools' definitions
    when given) and its token ids: the engine's own path (`yun/engine/inputs.py`, which
    `LLM.chat` and `yun chat` use too), its errors as 400s naming the field."""
    try:
        return inputs.render_chat(tok, [m.model_dump() for m in messages],
                                  add_generation_prompt, template_kwargs, tools)
    except InvalidParam as e:
        raise bad_request(str(e), e.param) from e


def completion_prompts(tok: PromptTokenizer, req: CompletionRequest) -> list[Prompt]:
    """One prompt per item: a string, a list of strings, token ids, or lists of them."""
    prompt = req.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", "prompt")
    add_special = req.add_special_tokens is not False
    return [(item, encode_prompt(tok, item, add_special)) if isinstance(item, str)
            else (None, list(item)) for item in items]

"""Requests -> prompt token ids: the model's own chat template, or the completions prompt
forms. Plain functions over the tokenizer; the server runs them in a worker thread."""

from __future__ import annotations

import json
from typing import Any, Protocol

from yun.server.errors import bad_request
from yun.server.protocol import ChatMessage, CompletionRequest

# chat_template_kwargs keys that would change what apply_chat_template returns.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})

Prompt = tuple[str | None, list[int]]  # (text if known, token ids)


class PromptTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str: ...


def message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content a string, tool arguments a dict."""
    content = m.content
    if isinstance(content, list):
        content = "\n".join(p.text or "" for p in content)
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                         "content": content or ""}
    if m.tool_calls and not content:  # as OpenAI sends it (see render_chat)
        d["content"] = None
    if m.name:
        d["name"] = m.name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        d["tool_calls"] = [_parsed_arguments(call) for call in m.tool_calls]
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
    when given, as the template lays them out), and its token ids."""
    kwargs = dict(template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}",
                          "chat_template_kwargs")
    if tools:
        kwargs["tools"] = tools
    dicts = [message_dict(m) for m in messages]
    try:
        text = tok.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt,
                                       **kwargs)
    except Exception as e:  # template errors are about the input (roles, content)
        if not any(d["content"] is None for d in dicts):
            raise bad_request(f"cannot render the chat template: {e}", "messages") from e
        # A tool-calling turn's null content reaches the template as a missing key, which
        # some templates handle and others (string operations on it) do not: try "".
        for d in dicts:
            d["content"] = d["content"] or ""
        try:
            text = tok.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
        except Exception as e2:
            raise bad_request(f"cannot render the chat template: {e2}", "messages") from e2
    if not isinstance(text, str):
        raise bad_request("the chat template did not render to text", "messages")
    return text, tok.encode(text, add_special_tokens=False)


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
    return [(item, tok.encode(item, add_special_tokens=add_special)) if isinstance(item, str)
            else (None, list(item)) for item in items]

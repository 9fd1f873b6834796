"""Structured output and tool choice -> the engine's `GuidedDecoding` (constrained decoding).

- `response_format` ({"type": "json_object"} / {"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}) and vLLM's `guided_json`, `guided_regex`,
  `guided_choice`, `guided_grammar` (EBNF): at most one per request.
- `tool_choice: "required"` constrains the output to a JSON list of calls
  `[{"name": <a tool>, "arguments": <its parameters' schema>}, ...]`, and a named
  function to its arguments object, whatever the model's own tool-call format.
The grammar itself is compiled (and a bad one refused with a 400) by the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from yun.engine.inputs import chat_tool
from yun.sampling_params import GuidedDecoding
from yun.server.errors import bad_request
from yun.server.protocol import ChatCompletionRequest, SamplingFields, ToolDefinition

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _schema(value: Any, param: str) -> dict[str, Any] | bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise bad_request(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object)", param)
    return value


def _response_format(fmt: dict[str, Any]) -> GuidedDecoding | None:
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GuidedDecoding(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with name and "
                              "schema", "response_format")
        if spec.get("schema") is None:
            return GuidedDecoding(json_object=True)
        return GuidedDecoding(json=_schema(spec["schema"], "response_format"))
    raise bad_request(f"response_format type must be text, json_object or json_schema, got "
                      f"{kind!r}", "response_format")


def guided_from_fields(req: SamplingFields) -> tuple[GuidedDecoding | None, str | None]:
    """The constraint a request asks for (response_format or guided_*), and its field name."""
    found: list[tuple[GuidedDecoding, str]] = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            found.append((spec, "response_format"))
    if req.guided_json is not None:
        found.append((GuidedDecoding(json=_schema(req.guided_json, "guided_json")),
                      "guided_json"))
    if req.guided_regex is not None:
        found.append((GuidedDecoding(regex=req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        if not req.guided_choice:
            raise bad_request("guided_choice must list at least one string", "guided_choice")
        found.append((GuidedDecoding(choice=tuple(req.guided_choice)), "guided_choice"))
    if req.guided_grammar is not None:
        found.append((GuidedDecoding(grammar=req.guided_grammar), "guided_grammar"))
    if req.structured_outputs is not None:
        found.extend(_structured_outputs(req.structured_outputs))
    if len(found) > 1:
        names = " and ".join(p for _, p in found)
        raise bad_request(f"only one output constraint per request, got {names}", found[1][1])
    return found[0] if found else (None, None)


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _structured_outputs(spec: dict[str, Any]) -> list[tuple[GuidedDecoding, str]]:
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object
    (other keys, e.g. its backend options, are ignored)."""
    given = [k for k in STRUCTURED_KINDS if spec.get(k) not in (None, False)]
    if len(given) != 1:
        raise bad_request("structured_outputs takes exactly one of "
                          f"{', '.join(STRUCTURED_KINDS)}; got {', '.join(given) or 'none'}",
                          "structured_outputs")
    kind = given[0]
    param, value = f"structured_outputs.{kind}", spec[kind]
    if kind == "json":
        return [(GuidedDecoding(json=_schema(value, param)), param)]
    if kind == "json_object":
        return [(GuidedDecoding(json_object=True), param)]
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{param} must list at least one string", param)
        return [(GuidedDecoding(choice=tuple(value)), param)]
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string", param)
    return [(GuidedDecoding(**{kind: value}), param)]


# ---- tools --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPlan:
    """What a chat request does with its tools."""

    mode: str  # "none" (no tools, or tool_choice none), "auto", "required", "named"
    tools: list[dict[str, Any]] | None  # for the chat template (None: do not render tools)
    guided: GuidedDecoding | None = None  # for "required" and "named"
    name: str | None = None  # the named function


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    choice = req.tool_choice
    tools = req.tools or []
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools: list the functions the model may "
                              "call", "tool_choice")
        return ToolPlan("none", None)
    names = [t.function.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise bad_request(f"tools must have distinct names; repeated: {', '.join(dupes)}",
                          "tools")
    if choice == "none":
        return ToolPlan("none", None)  # the model is not told about tools it cannot call
    rendered = [_rendered(t) for t in tools]
    if choice in (None, "auto"):
        return ToolPlan("auto", rendered)
    if choice == "required":
        return ToolPlan("required", rendered, GuidedDecoding(
            json=_calls_schema(tools, one=req.parallel_tool_calls is False)))
    name = choice.function.name  # a NamedToolChoice (the protocol allows nothing else)
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                          f"({', '.join(names)})", "tool_choice")
    return ToolPlan("named", rendered, GuidedDecoding(json=_parameters(tool)), name)


def _rendered(tool: ToolDefinition) -> dict[str, Any]:
    """The tool as templates expect it (yun/engine/inputs.py's `chat_tool`, which
    `LLM.chat` uses too)."""
    return chat_tool(tool.model_dump(exclude_none=True))


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    params = tool.function.parameters
    return params if params else dict(EMPTY_PARAMETERS)


def _calls_schema(tools: list[ToolDefinition], one: bool) -> dict[str, Any]:
    """A JSON list of calls, each one of the tools with arguments valid for it. Each tool's
    own `$defs` move to the root, renamed per tool so that two tools cannot collide."""
    variants, defs = [], {}
    for t in tools:
        params = json.loads(json.dumps(_parameters(t)))  # a deep copy we may rewrite
        local = {**params.pop("definitions", {}), **params.pop("$defs", {})}
        prefix = f"{t.function.name}__"
        renames = {f"#/$defs/{k}": f"#/$defs/{prefix}{k}" for k in local}
        renames.update({f"#/definitions/{k}": f"#/$defs/{prefix}{k}" for k in local})
        params = _rewrite_refs(params, renames)
        defs.update({prefix + k: _rewrite_refs(v, renames) for k, v in local.items()})
        variants.append({"type": "object", "properties": {
            "name": {"type": "string", "enum": [t.function.name]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if one:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _rewrite_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (renames.get(v, v) if k == "$ref" and isinstance(v, str)
                    else _rewrite_refs(v, renames)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node

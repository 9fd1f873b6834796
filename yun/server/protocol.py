"""The OpenAI API's shapes as pydantic models, and request -> SamplingParams fields.

Requests accept unknown fields (clients send many: `store`, `metadata`, ...) and ignore
them; known fields are type-checked here and value-checked by `SamplingParams` when the
input processor builds it (once), whose InvalidParam becomes a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer)

from yun.engine.inputs import InputProcessor
from yun.sampling_params import InvalidParam, SamplingParams
from yun.server.errors import APIError, bad_request

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]

MAX_N = 128  # completions per prompt
MAX_LOGPROBS = 20  # top alternatives per position
MIN_TEMPERATURE = 1e-5  # below this, sampling is treated as greedy (avoids inf logits)
MAX_TEMPERATURE = 100.0


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# ---- requests ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v not in ("text", "input_text"):
            raise ValueError(f"only text content parts are supported, got {v!r}")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionName


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    n: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: Int64 | None = 0
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Structured output (constrained decoding), see yun/server/structured.py.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's current form of the above: {"json" | "regex" | "choice" | "grammar" |
    # "json_object": ...}, one key per request.
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    # Thinking models: passed to the chat template (reasoning_effort; "none" also sets
    # enable_thinking false, as Qwen3's template reads it).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # Thinking models: reasoning in `reasoning_content` (false: the raw text in content).
    separate_reasoning: bool | None = True


PromptType = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    logprobs: Int64 | None = None
    echo: bool | None = False
    best_of: Int64 | None = None
    suffix: str | None = None
    add_special_tokens: bool | None = True

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             f"(0 to {2**31 - 1}) or a list of token-id lists") from None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses -----------------------------------------------------------------------------
def _without_unset_extras(data: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k not in optional}


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: dict[str, int] | None = None  # {"reasoning_tokens": N}
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": N}

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _without_unset_extras(handler(self), ("completion_tokens_details",
                                                     "prompt_tokens_details"))


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name", "arguments": JSON text}


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _without_unset_extras(handler(self), ("reasoning_content", "tool_calls"))


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # role, content, reasoning_content, tool_calls: what is new
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and one stream chunk (object "text_completion" either way)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "yun"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- request -> SamplingParams -------------------------------------------------------------
def _first(*values: Any, default: Any = None) -> Any:
    return next((v for v in values if v is not None), default)


def _server_limits(req: SamplingFields, logprobs: int | None, logprobs_param: str) -> float:
    """Bounds SamplingParams does not impose but the server needs (sizes a client could
    abuse, values that would turn logits into inf or NaN). Returns the temperature to use:
    below MIN_TEMPERATURE sampling is greedy."""
    n = _first(req.n, default=1)
    if n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {n}", "n")
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(f"{logprobs_param} must be at most {MAX_LOGPROBS}, got {logprobs}",
                          logprobs_param)
    repetition_penalty = _first(req.repetition_penalty, default=1.0)
    if repetition_penalty != 1.0 and not 0.01 <= repetition_penalty <= 100.0:
        raise bad_request("repetition_penalty must be in [0.01, 100], got "
                          f"{repetition_penalty}", "repetition_penalty")
    temperature = _first(req.temperature, default=1.0)
    if temperature > MAX_TEMPERATURE:
        raise bad_request(f"temperature must be at most {MAX_TEMPERATURE:g}, got {temperature}",
                          "temperature")
    return 0.0 if 0 < temperature < MIN_TEMPERATURE else temperature


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not bias:
        return None
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise bad_request("logit_bias must map token ids (integers, as strings) to biases "
                          f"in [-100, 100], got keys {sorted(bias)[:3]}", "logit_bias") from None


class ParamFields:
    """A request's SamplingParams fields, read and bounded by the server but not yet
    built: the input processor builds them once, with what the endpoint adds (tools,
    reasoning, output kind, priority). `names`: engine field -> the API's name for it, in
    errors (max_tokens -> max_completion_tokens)."""

    def __init__(self, fields: dict[str, Any], names: dict[str, str]):
        self.fields = fields
        self.names = names

    def build(self, inputs: InputProcessor, **more: Any) -> SamplingParams:
        """The SamplingParams, validated once; APIError(400) naming the bad field."""
        try:
            return inputs.sampling_params(**{**self.fields, **more})
        except InvalidParam as e:  # "<field> must ..., got ...": in the API's field names
            field, message = e.param, str(e)
            param = self.names.get(field, field)
            if message.startswith(field):
                message = param + message[len(field):]
            raise APIError(400, message, param=param) from e


def sampling_fields(req: SamplingFields, *, max_tokens: int | None,
                    max_tokens_param: str = "max_tokens", logprobs: int | None = None,
                    prompt_logprobs: int | None = None,
                    logprobs_param: str = "logprobs") -> ParamFields:
    """The engine's SamplingParams fields for this request (APIError(400) for what the
    server bounds); SamplingParams checks the values when they are built."""
    temperature = _server_limits(req, logprobs, logprobs_param)
    fields = dict(
        n=_first(req.n, default=1),
        max_tokens=max_tokens,
        min_tokens=_first(req.min_tokens, default=0),
        temperature=temperature,
        top_p=_first(req.top_p, default=1.0),
        top_k=_first(req.top_k, default=0),
        min_p=_first(req.min_p, default=0.0),
        repetition_penalty=_first(req.repetition_penalty, default=1.0),
        presence_penalty=_first(req.presence_penalty, default=0.0),
        frequency_penalty=_first(req.frequency_penalty, default=0.0),
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=bool(req.ignore_eos),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=_first(req.skip_special_tokens, default=True),
        logit_bias=_logit_bias(req.logit_bias),
    )
    return ParamFields(fields, {"max_tokens": max_tokens_param, "logprobs": logprobs_param,
                                "prompt_logprobs": logprobs_param})


def chat_sampling_fields(req: ChatCompletionRequest) -> ParamFields:
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = req.max_tokens, "max_tokens"
    logprobs = None
    if req.logprobs:
        logprobs = _first(req.top_logprobs, default=0)
    elif req.top_logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return sampling_fields(req, max_tokens=max_tokens, max_tokens_param=param,
                           logprobs=logprobs, logprobs_param="top_logprobs")


def completion_sampling_fields(req: CompletionRequest) -> ParamFields:
    """`echo` with `logprobs` also scores the prompt; `max_tokens: 0` with `echo` only does
    that (the engine generates one token that the response leaves out)."""
    max_tokens = _first(req.max_tokens, default=16)
    if req.echo and max_tokens == 0:
        max_tokens = 1
    if req.best_of is not None and req.best_of != _first(req.n, default=1):
        raise bad_request("best_of is not supported (leave it unset or equal to n)", "best_of")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    return sampling_fields(req, max_tokens=max_tokens, logprobs=req.logprobs,
                           prompt_logprobs=prompt_logprobs)

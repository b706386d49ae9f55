"""Request and response models of the saelora HTTP API: OpenAI shapes plus the `sae` extension.

Defined once, used by the server (validation, OpenAPI docs) and by the client. Imports pydantic and the
steering vocabulary (saelora.adapters.edits) only: no torch, so `pip install saelora[client]` stays light.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saelora.adapters.edits import MAX_EDIT_VALUE, SERVE_MODE, Mode, Op, PositionWord

MAX_TOP_K = 64  # latents per token per SAE
MAX_EDITS = 64
MAX_N = 8
MAX_LOGPROBS = 20

SpliceMode = Mode  # the steering vocabulary's home is saelora.adapters.edits (no torch)
EditOp = Op


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number (NaN and Inf are rejected)")
    return v


class SAEEdit(_Strict):
    """A latent edit: `op` on latent `feature` of SAE `sae` at `positions`."""

    sae: str | None = Field(None, description="SAE id (GET /v1/saes); may be omitted when one SAE is loaded")
    feature: int = Field(..., ge=0, description="latent index, 0 <= feature < d_sae")
    op: EditOp
    value: float = Field(0.0, ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE)
    positions: PositionWord | list[Annotated[int, Field(ge=0)]] = "all"

    _check_value = field_validator("value")(classmethod(lambda cls, v: _finite(v)))


class SAEFeatureOptions(_Strict):
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="latents returned per token and SAE (0: none)")
    include_prompt: bool = Field(False, description="also return the prompt tokens' latents")
    saes: list[str] | None = Field(None, description="SAE ids to report (default: all)")


class SAEOptions(_Strict):
    """The `sae` request extension (send it through the openai SDK's `extra_body`)."""

    mode: SpliceMode = SERVE_MODE
    features: SAEFeatureOptions | None = None
    edits: list[SAEEdit] = Field(default_factory=list, max_length=MAX_EDITS)


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    sae: SAEOptions | None = None

    _finite_floats = field_validator("temperature", "top_p")(classmethod(lambda cls, v: _finite(v)))

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: a list of several strings is not supported; send one request per prompt")
        if isinstance(self.prompt, (str, list)) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def prompt_text_or_ids(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]  # type: ignore[return-value]
        return self.prompt  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class FeaturesRequest(_Strict):
    """POST /v1/features: encode only, no generation."""

    model: str
    input: str | None = None
    messages: list[ChatMessage] | None = None
    top_k: int = Field(8, ge=1, le=MAX_TOP_K)
    saes: list[str] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "FeaturesRequest":
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of `input` (text) or `messages` (chat)")
        if self.input is not None and not self.input:
            raise ValueError("input must not be empty")
        return self


# ---- responses --------------------------------------------------------------------------------------------

class SAELatents(BaseModel):
    sae: str
    indices: list[int]
    values: list[float]


class TokenFeatures(BaseModel):
    token: str
    token_id: int
    position: int
    features: list[SAELatents]


class ChoiceFeatures(BaseModel):
    prompt: list[TokenFeatures] | None = None
    generated: list[TokenFeatures] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "error"] | None = None
    logprobs: CompletionLogprobs | None = None
    features: ChoiceFeatures | None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "error"] | None = None
    logprobs: ChatLogprobs | None = None
    features: ChoiceFeatures | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "error"] | None = None
    logprobs: ChatLogprobs | None = None
    features: ChoiceFeatures | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class FeaturesResponse(BaseModel):
    object: Literal["features"] = "features"
    model: str
    tokens: list[TokenFeatures]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "saelora"
    root: str | None = None
    parent: str | None = None
    saes: list[dict[str, Any]] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SAEInfo(BaseModel):
    id: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    source: str
    fingerprint: str
    has_descriptions: bool = False
    policy: dict[str, Any] | None = Field(default=None, description="positions left original (never spliced or "
                                          "edited): keep_first, keep_token_ids, prepend_bos")


class SAEList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SAEInfo]


class FeatureDescription(BaseModel):
    sae: str
    index: int
    density: float | None = None
    max: float | None = None
    top: list[dict[str, Any]] = Field(default_factory=list)
    described: bool = False


class LoadLoRARequest(_Strict):
    lora_name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    lora_path: str = Field(..., min_length=1)


class UnloadLoRARequest(_Strict):
    lora_name: str = Field(..., min_length=1)


class AdapterInfo(BaseModel):
    name: str
    path: str
    rank: int
    saes: list[str]
    in_flight: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

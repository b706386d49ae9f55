"""Request and response models of the saelora HTTP API: OpenAI shapes plus the `sae` extension.

Defined once, used by the server (validation, OpenAPI docs) and by the client. Imports pydantic and the
steering vocabulary (saelora.adapters.edits) only: no torch, so `pip install saelora[client]` stays light.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator

from saelora.adapters.edits import MAX_EDIT_VALUE, SERVE_MODE, Mode, Op, PositionWord, Unit, VectorOp, VectorUnit

from .compact import CompactFeatures  # noqa: F401  (re-exported: a ChoiceFeatures field)
from .protocol_base import (ADAPTER_NAME, LOGIT_TOP, MAX_EDITS, MAX_LOGPROBS, MAX_N, MAX_PATH, MAX_POSITION,  # noqa: F401
                            MAX_POSITIONS, MAX_PRESETS, MAX_PROMPT_IDS, MAX_SEED, MAX_STOP_WHEN, MAX_STOPS, MAX_TOP_K,
                            MAX_VECTOR, MAX_VECTOR_EDITS, PRESET_NAME, JFloat, JInt, VectorValue, _finite, _json_bool,
                            _json_number, _Strict, jint)

SpliceMode = Mode  # the steering vocabulary's home is saelora.adapters.edits (no torch)
EditOp = Op


class SAECondition(_Strict):
    """Latent `feature` of SAE `sae`, before any edit, is above `above` at a token."""

    sae: str | None = Field(None, description="SAE id; default: the edit's SAE (for `when`), or the only SAE")
    feature: JInt = Field(..., ge=0, description="latent index, 0 <= feature < d_sae")
    above: JFloat = Field(..., ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE)

    _check_above = field_validator("above")(classmethod(lambda cls, v: _finite(v)))


class SAEEdit(_Strict):
    """A latent edit: `op` on latent `feature` of SAE `sae` at `positions` (with `when`, only at the tokens where
    that latent of the same SAE, before any edit, is above a threshold)."""

    sae: str | None = Field(None, description="SAE id (GET /v1/saes); may be omitted when one SAE is loaded")
    feature: JInt = Field(..., ge=0, description="latent index, 0 <= feature < d_sae")
    op: EditOp
    value: JFloat = Field(0.0, ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE)
    positions: PositionWord | Annotated[list[jint(ge=0, le=MAX_POSITION)],
                                        Field(min_length=1, max_length=MAX_POSITIONS)] = "all"
    when: SAECondition | None = Field(None, description="apply only where this condition holds")
    unit: Unit = Field("raw", description="raw: the value as given; max: a multiple of the latent's max activation "
                                          "on the description corpus; norm: a fraction of the median residual norm at "
                                          "the hook, along the latent's decoder direction (docs/api.md)")

    _check_value = field_validator("value")(classmethod(lambda cls, v: _finite(v)))


class _VectorEditBase(_Strict):
    sae: str | None = Field(None, description="SAE id whose hook point the vector acts at; may be omitted when one "
                                              "SAE is loaded (a stored vector brings its own)")
    op: VectorOp = Field("add", description="add: x += value * v; project: x += value * (x . v^) v^ (the paper's "
                                            "projection scaling)")
    value: JFloat = Field(1.0, ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE)
    unit: VectorUnit = Field("raw", description="raw, or norm with add: |value * v| = value x the median residual "
                                                "norm at the hook; project's value is a pure multiplier in any unit")
    positions: PositionWord | Annotated[list[jint(ge=0, le=MAX_POSITION)],
                                        Field(min_length=1, max_length=MAX_POSITIONS)] = "all"
    when: SAECondition | None = Field(None, description="apply only where this condition holds")

    _check_value = field_validator("value")(classmethod(lambda cls, v: _finite(v)))


class SAEVectorByName(_VectorEditBase):
    """Steer along a stored steering vector (PUT /v1/steering/vectors/{name})."""

    vector: str = Field(..., pattern=PRESET_NAME, description="a stored steering vector's name")


class SAEVectorValues(_VectorEditBase):
    """Steer along a direction given as numbers (d_in of them; an all-zero direction does nothing)."""

    values: list[VectorValue] = Field(..., min_length=1, max_length=MAX_VECTOR)


SAEVectorEdit = SAEVectorByName | SAEVectorValues


class SAEFeatureOptions(_Strict):
    top_k: JInt = Field(0, ge=0, le=MAX_TOP_K, description="latents returned per token and SAE (0: none)")
    include_prompt: StrictBool = Field(False, description="also return the prompt tokens' latents")
    saes: list[str] | None = Field(None, description="SAE ids to report (default: all)")
    format: Literal["full", "compact"] = Field("full", description="full: one object per token and SAE; compact: "
                                               "parallel base64 arrays per choice, float16 values "
                                               "(saelora.clients.compact)")


class SAEOptions(_Strict):
    """The `sae` request extension (send it through the openai SDK's `extra_body`)."""

    mode: SpliceMode = Field(SERVE_MODE, description="default: the preset's mode, else error_term")
    features: SAEFeatureOptions | None = None
    edits: list[SAEEdit] = Field(default_factory=list, max_length=MAX_EDITS,
                                 description="applied after the preset's edits, when a preset is named")
    vectors: list[SAEVectorEdit] = Field(default_factory=list, max_length=MAX_VECTOR_EDITS,
                                         description="steering vectors, applied after the preset's")
    preset: str | None = Field(None, pattern=PRESET_NAME, description="a steering preset (GET /v1/steering/presets)")
    stop_when: list[SAECondition] = Field(default_factory=list, max_length=MAX_STOP_WHEN,
                                          description="end with finish_reason stop once one holds at a generated "
                                                      "token (the token that set it off is included)")
    compare: StrictBool = Field(False, description="also return each choice unsteered: the same request without "
                                                   "edits (the preset's included), same seed, same batch")

    def mode_or(self, preset_mode: str | None) -> str:
        """The request's mode when it set one, else the preset's, else the default."""
        return self.mode if "mode" in self.model_fields_set or preset_mode is None else preset_mode


class SteeringPreset(_Strict):
    """A named set of latent edits and steering vectors (PUT /v1/steering/presets/{name}); requests use it with
    `"sae": {"preset": name}`. An empty preset steers nothing."""

    mode: SpliceMode = SERVE_MODE
    edits: list[SAEEdit] = Field(default_factory=list, max_length=MAX_EDITS)
    vectors: list[SAEVectorEdit] = Field(default_factory=list, max_length=MAX_VECTOR_EDITS)


class PresetInfo(SteeringPreset):
    name: str


class PresetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PresetInfo]


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model or a loaded adapter (default: the served model)")
    max_tokens: jint(ge=1) | None = None
    temperature: JFloat = Field(1.0, ge=0.0, le=2.0)  # as OpenAI (and vLLM) bound it
    top_p: JFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: jint(ge=-1) | None = None
    n: JInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=MAX_STOPS)] | None = None
    seed: jint(ge=0, le=MAX_SEED) | None = None
    ignore_eos: StrictBool = Field(False, description="go on past end-of-sequence tokens until max_tokens or a stop "
                                   "string (vLLM's extension; for benchmarks and long-request tests)")
    sae: SAEOptions | None = None

    _finite_floats = field_validator("temperature", "top_p")(classmethod(lambda cls, v: _finite(v)))

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


class CompletionRequest(_SamplingRequest):
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[jint(ge=0)], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[list[jint(ge=0)], Field(min_length=1, max_length=MAX_PROMPT_IDS)]],
                         Field(min_length=1, max_length=1)]) = Field(
        ..., description="text, token ids, or a list of exactly one of either (one request per prompt)")
    max_tokens: jint(ge=0) | None = Field(16, description="0: an empty completion (with echo and logprobs, or "
                                                          "prompt_logprobs: the prompt scored)")
    logprobs: jint(ge=0, le=MAX_LOGPROBS) | None = None
    echo: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        False, description="return the prompt before the completion; with logprobs, each prompt token's logprob "
                           "too (null for the first), under the request's model, adapter and splice")
    prompt_logprobs: jint(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="vLLM's extension: each prompt token's logprob, rank and the top k, in the choice's "
                          "prompt_logprobs (null for the first token)")

    def prompt_text_or_ids(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return self.prompt[0]  # type: ignore[return-value]
        return self.prompt  # type: ignore[return-value]

    def prompt_scores_k(self) -> int | None:
        """The top-k the engine scores the prompt with (None: not scored): echo with logprobs, prompt_logprobs."""
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(asked) if asked else (0 if self.echo else None)


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
    max_completion_tokens: jint(ge=1) | None = None
    logprobs: StrictBool = False
    top_logprobs: jint(ge=0, le=MAX_LOGPROBS) | None = None

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class FeaturesRequest(_Strict):
    """POST /v1/features: encode only, no generation. Exactly one of `input` and `messages`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["input"], "not": {"required": ["messages"]}},
                  {"required": ["messages"], "not": {"required": ["input"]}}]})

    model: str | None = Field(None, description="the served model or a loaded adapter (default: the served model)")
    # Optional but never null (the schema says string / array): the oneOf above is then exactly the rule.
    input: Annotated[str, Field(min_length=1)] = None  # type: ignore[assignment]
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = None  # type: ignore[assignment]
    top_k: JInt = Field(8, ge=1, le=MAX_TOP_K)
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
    compact: CompactFeatures | None = None  # with "format": "compact" (then prompt and generated are empty)

    def tokens(self) -> tuple[list[TokenFeatures] | None, list[TokenFeatures]]:
        """(prompt, generated) latents in the full form's objects, whichever form the server sent."""
        if self.compact is None:
            return self.prompt, self.generated
        prompt, generated = self.compact.decode()
        return (prompt or None), generated


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Over the echoed prompt (when `echo`) and the completion; the prompt's first token has null entries."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's `prompt_logprobs` entry: one token's logprob at a prompt position, its rank there (1: the most
    likely), and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class Unsteered(BaseModel):
    """A choice generated without the request's edits (`"compare": true`); in a stream, `text` is a delta."""

    text: str = ""
    finish_reason: Literal["stop", "length", "error"] | None = None
    features: ChoiceFeatures | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "error"] | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="with prompt_logprobs: per prompt position, token id -> its logprob (the prompt's own "
                          "token and the top k); null for the first")
    features: ChoiceFeatures | None = None
    unsteered: Unsteered | None = None


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
    unsteered: Unsteered | None = None


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
    unsteered: Unsteered | None = None


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


# the server's resources (models, SAEs, features, adapters) and the error envelope, re-exported so that
# `protocol.X` names every model of the API
from .protocol_resources import (AdapterInfo, AdapterList, ErrorBody, ErrorResponse,  # noqa: E402, F401
                                 FeatureDescription, FeatureHistogram, LatentLogits, LoadLoRARequest, ModelCard,
                                 ModelList, SAEInfo, SAEList, TokenValue, UnloadLoRARequest)

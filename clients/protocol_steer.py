"""Request and response models of the steering routes beside the preset ones: steering vectors, feature search
and auto-steer. Pydantic only (no torch), like clients/protocol.py, whose building blocks they use."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .protocol import MAX_VECTOR, PRESET_NAME, JFloat, PresetInfo, VectorValue, _Strict

MAX_TEXTS = 64  # texts per side of a DiffMean vector or an auto-steer call
MAX_TEXT_CHARS = 4000
MAX_AUTO_PROMPTS = 8
MAX_SEARCH = 50

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=r"\S")]  # not only white space


class VectorFromValues(_Strict):
    """PUT /v1/steering/vectors/{name} with numbers: a direction at SAE `sae`'s hook (d_in numbers)."""

    sae: str | None = Field(None, description="SAE id whose hook point the vector acts at (default: the only SAE)")
    values: list[VectorValue] = Field(..., min_length=1, max_length=MAX_VECTOR)


class VectorFromTexts(_Strict):
    """PUT /v1/steering/vectors/{name} from two text sets: the difference of their mean residuals at the hook
    (`positive` minus `negative`: DiffMean). Only engines that run the model in the server process offer it (the
    torch engine); elsewhere this body is not part of the API."""

    sae: str | None = Field(None, description="SAE id whose hook point the vector acts at (default: the only SAE)")
    positive: list[Text] = Field(..., min_length=1, max_length=MAX_TEXTS, description="texts of the concept")
    negative: list[Text] = Field(..., min_length=1, max_length=MAX_TEXTS, description="other texts")


class StoredVector(_Strict):
    """A steering vector as the server keeps it."""

    sae: str
    values: list[float]
    source: Literal["values", "diffmean"]
    texts: dict[str, int] = Field(default_factory=dict, description="texts per side, for a DiffMean vector")


class VectorInfo(StoredVector):
    name: str
    norm: float


class VectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorInfo]


class SearchHit(BaseModel):
    index: int
    score: float
    density: float
    max: float
    tokens: list[str] = Field(description="tokens of its top contexts")
    promoted: list[str] = Field(default_factory=list, description="tokens it writes to the logits most")


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    sae: str
    query: str
    data: list[SearchHit]


class SimilarLatent(BaseModel):
    index: int
    cosine: float = Field(description="cosine of the two latents' decoder directions")


class SimilarResponse(BaseModel):
    object: Literal["list"] = "list"
    sae: str
    index: int
    data: list[SimilarLatent]


class AutoSteerRequest(_Strict):
    """POST /v1/steering/auto: search, a strength sweep and a judge, from example texts; the winner is stored as
    preset `name`. Offered by engines that run the model in the server process (the torch engine)."""

    name: str = Field(..., pattern=PRESET_NAME)
    positive: list[Text] = Field(..., min_length=4, max_length=MAX_TEXTS, description="texts of the concept")
    negative: list[Text] | None = Field(None, min_length=4, max_length=MAX_TEXTS,
                                        description="other texts (default: everyday texts shipped with saelora)")
    prompts: list[Text] | None = Field(None, min_length=1, max_length=MAX_AUTO_PROMPTS,
                                       description="neutral prompts to tune on (default: six built-in ones)")
    sae: str | None = None
    max_fluency_gap: JFloat = Field(0.5, gt=0, le=10, description="nats of CE above the model's CE on the "
                                                                   "positive texts that a generation may reach")


class AutoSteerResponse(BaseModel):
    preset: PresetInfo
    measured: dict[str, Any] = Field(description="the winner's concept score, fluency_gap, distinct2, success, "
                                                 "method and strength (norm units), by auto-steer's own judge, "
                                                 "from a second run with a fresh seed (sweep_concept: its score "
                                                 "in the sweep, biased upward by the choice)")
    candidates: list[dict[str, Any]] = Field(default_factory=list, description="every setting it tried")
    seconds: float
